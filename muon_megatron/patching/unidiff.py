"""Unified diffs: parse them and apply their hunks to text, in pure Python (no GNU patch, no git).

Matching is exact (no fuzz): a hunk applies where its old side (context and removed lines)
occurs verbatim, compared line by line without line terminators. Among the places it occurs at
or after the end of the previous hunk, the one nearest to the hunk's stated line wins (as
``git apply`` does), so one patch applies across releases whose files moved the hook's lines.
A hunk whose new side is found instead is reported as already applied.

Lines keep the file's own terminators; added lines get the terminator most of the file uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$")


class PatchFormatError(ValueError):
    """The text is not a unified diff this module understands."""


@dataclass(frozen=True)
class Hunk:
    """One ``@@`` block. ``lines`` keep their first character: ``' '`` context, ``'-'`` removed,
    ``'+'`` added; no line terminators."""

    old_start: int
    new_start: int
    lines: tuple[str, ...]
    section: str = ""
    """Text after the closing ``@@`` (usually the enclosing function); for messages only."""

    @property
    def old_lines(self) -> list[str]:
        return [line[1:] for line in self.lines if line[0] in " -"]

    @property
    def new_lines(self) -> list[str]:
        return [line[1:] for line in self.lines if line[0] in " +"]

    def reversed(self) -> "Hunk":
        flip = {" ": " ", "-": "+", "+": "-"}
        lines = tuple(flip[line[0]] + line[1:] for line in self.lines)
        return Hunk(self.new_start, self.old_start, lines, self.section)


@dataclass(frozen=True)
class FilePatch:
    """The hunks of one file. ``path`` is relative to the tree root (``a/`` / ``b/`` stripped)."""

    path: str
    hunks: tuple[Hunk, ...]
    creates: bool = False
    """The old side is ``/dev/null``: the file is new."""

    def reversed(self) -> "FilePatch":
        return FilePatch(self.path, tuple(h.reversed() for h in self.hunks), creates=False)


def _strip_prefix(name: str) -> str:
    name = name.split("\t", 1)[0].strip()
    if name.startswith(("a/", "b/")):
        name = name[2:]
    return name


def parse_patch(text: str) -> list[FilePatch]:
    """The file patches of a unified diff (``git diff`` or ``diff -u`` output). Lines outside
    ``---``/``+++``/``@@`` blocks (commit messages, ``diff --git`` lines) are ignored."""
    lines = text.splitlines()
    patches: list[FilePatch] = []
    i = 0
    while i < len(lines):
        if not (lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")):
            i += 1
            continue
        old_name, new_name = lines[i][4:], lines[i + 1][4:]
        creates = old_name.split("\t", 1)[0].strip() == "/dev/null"
        path = _strip_prefix(new_name if creates else old_name)
        i += 2
        hunks = []
        while i < len(lines) and lines[i].startswith("@@"):
            match = _HUNK_HEADER.match(lines[i])
            if not match:
                raise PatchFormatError(f"bad hunk header in the patch of {path}: {lines[i]!r}")
            old_count = int(match.group(2) if match.group(2) is not None else 1)
            new_count = int(match.group(4) if match.group(4) is not None else 1)
            body: list[str] = []
            i += 1
            seen_old = seen_new = 0
            while seen_old < old_count or seen_new < new_count:
                if i >= len(lines):
                    raise PatchFormatError(f"hunk {len(hunks) + 1} of {path} ends early")
                line = lines[i]
                i += 1
                if line.startswith("\\"):  # "\ No newline at end of file"
                    continue
                if line == "":  # some editors strip the space of an empty context line
                    line = " "
                tag = line[0]
                if tag not in " -+":
                    raise PatchFormatError(f"hunk {len(hunks) + 1} of {path}: unexpected line {line!r}")
                seen_old += tag in " -"
                seen_new += tag in " +"
                body.append(line)
            while i < len(lines) and lines[i].startswith("\\"):
                i += 1
            if seen_old != old_count or seen_new != new_count:
                raise PatchFormatError(f"hunk {len(hunks) + 1} of {path}: line counts disagree with its header")
            hunks.append(Hunk(int(match.group(1)), int(match.group(3)), tuple(body), match.group(5).strip()))
        if not hunks:
            raise PatchFormatError(f"the patch of {path} has no hunks")
        patches.append(FilePatch(path, tuple(hunks), creates))
    if not patches:
        raise PatchFormatError("no file patches found (expected '--- a/...' / '+++ b/...' headers)")
    return patches


@dataclass(frozen=True)
class HunkResult:
    """What happened to one hunk. ``line`` is 1-based in the file before the patch."""

    path: str
    index: int
    """1-based position of the hunk in its file patch."""
    status: str
    """``"ok"`` (applies), ``"applied"`` (its new side is already there) or ``"fails"``."""
    line: Optional[int] = None
    offset: int = 0
    """Where it matched minus where its header said (lines)."""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        where = f"{self.path} hunk {self.index}"
        if self.status == "ok":
            shift = f" (offset {self.offset:+d} lines)" if self.offset else ""
            return f"{where}: applies at line {self.line}{shift}"
        if self.status == "applied":
            return f"{where}: already applied at line {self.line}"
        return f"{where}: FAILS: {self.reason}"


@dataclass
class FileResult:
    """The outcome of one file patch: per-hunk results and, when every hunk applies, the new text."""

    path: str
    hunks: list[HunkResult] = field(default_factory=list)
    new_text: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.new_text is not None


def _keys(lines: Sequence[str]) -> list[str]:
    return [line.rstrip("\r\n") for line in lines]


def _positions(haystack: list[str], needle: list[str], start: int) -> list[int]:
    if not needle:
        return []
    last = len(haystack) - len(needle)
    first = needle[0]
    return [p for p in range(start, last + 1) if haystack[p] == first and haystack[p:p + len(needle)] == needle]


def _nearest(positions: list[int], expected: int) -> Optional[int]:
    return min(positions, key=lambda p: (abs(p - expected), p)) if positions else None


def _why_not(keys: list[str], old: list[str], expected: int, start: int) -> str:
    """Explain a failed match: the candidate position matching most of the old side, and its first
    differing line."""
    best, best_score = None, -1
    for p in range(start, max(start, len(keys) - len(old)) + 1):
        score = sum(1 for a, b in zip(keys[p:p + len(old)], old) if a == b)
        nearer = best is not None and abs(p - expected) < abs(best - expected)
        if score > best_score or (score == best_score and nearer):
            best, best_score = p, score
    if best is None or best_score <= 0:
        return f"none of its {len(old)} context/removed lines occur in the file"
    for k, (have, want) in enumerate(zip(keys[best:best + len(old)] + [None] * len(old), old)):
        if have != want:
            shown = "end of file" if have is None else repr(have.strip())
            return (
                f"context not found; nearest candidate at line {best + 1} differs at line {best + k + 1}: "
                f"expected {want.strip()!r}, found {shown}"
            )
    return "context not found"


def apply_file_patch(patch: FilePatch, text: Optional[str]) -> FileResult:
    """Apply ``patch`` to ``text`` (None: the file does not exist) without touching any file.
    ``result.new_text`` is None unless every hunk applies; the hunk results say why."""
    result = FileResult(patch.path)
    if text is None:
        if not patch.creates:
            result.hunks = [
                HunkResult(patch.path, i + 1, "fails", reason="file not found") for i in range(len(patch.hunks))
            ]
            return result
        text = ""
    elif patch.creates:
        if text.strip():
            result.hunks = [HunkResult(patch.path, 1, "fails", reason="file already exists")]
            return result
    lines = text.splitlines(keepends=True)
    crlf = sum(line.endswith("\r\n") for line in lines)
    newline = "\r\n" if crlf > len(lines) // 2 and crlf else "\n"
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += newline  # added lines may follow it
        trailing_missing = True
    else:
        trailing_missing = False
    keys = _keys(lines)
    out: list[str] = []
    cursor = 0  # first line not yet copied to out
    shift = 0  # cumulative offset of matched hunks
    ok = True
    for index, hunk in enumerate(patch.hunks, start=1):
        old, new = hunk.old_lines, hunk.new_lines
        expected = max(hunk.old_start - 1 + shift, cursor)
        if old:
            found = _nearest(_positions(keys, old, cursor), expected)
        else:  # pure insertion (a new file, or -U0): at the stated line
            found = min(max(hunk.old_start - (1 if hunk.old_start else 0), cursor), len(keys))
        if found is None:
            done = _nearest(_positions(keys, new, 0), expected) if new else None
            if done is not None and new != old:
                result.hunks.append(HunkResult(patch.path, index, "applied", line=done + 1))
            else:
                reason = _why_not(keys, old, expected, cursor)
                result.hunks.append(HunkResult(patch.path, index, "fails", reason=reason))
            ok = False
            continue
        result.hunks.append(HunkResult(patch.path, index, "ok", line=found + 1, offset=found - (hunk.old_start - 1)))
        shift = found - (hunk.old_start - 1)
        out.extend(lines[cursor:found])
        # keep the file's own text (terminators included) for context lines
        ctx = iter(lines[found:found + len(old)])
        for tag_line in hunk.lines:
            tag, body = tag_line[0], tag_line[1:]
            if tag == " ":
                out.append(next(ctx))
            elif tag == "-":
                next(ctx)
            else:
                out.append(body + newline)
        cursor = found + len(old)
    if ok:
        out.extend(lines[cursor:])
        new_text = "".join(out)
        if trailing_missing and new_text.endswith(newline) and cursor == len(lines):
            new_text = new_text[: -len(newline)]
        result.new_text = new_text
    return result
