"""``check``, ``apply`` and ``revert`` of a patch set on a tree, all or nothing.

- :func:`check_tree` computes every patched file in memory and reports each hunk (applies at line
  N / already applied / fails, and why). Nothing is written.
- :func:`apply_tree` writes only when every hunk of every file applies: originals are copied to
  ``<tree>/.muon-megatron-patch/backup/`` first, with a ``state.json`` naming the patch set and the
  checksums; each file is replaced through a temporary file and ``os.replace``; if a write fails
  the files already replaced are restored before the error is raised.
- :func:`revert_tree` restores the backups when the patched files are unchanged since ``apply``;
  otherwise (edited since, or patched by hand / committed in a fork, so no backup) it
  reverse-applies the hunks, again all or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .patchsets import PatchSet, load_patch_sets, select_patch_set
from .release import Release, detect_release
from .unidiff import FileResult, HunkResult, apply_file_patch

STATE_DIR = ".muon-megatron-patch"


class PatchError(RuntimeError):
    """A patch set cannot be applied or reverted; nothing was changed."""


@dataclass
class Report:
    """The outcome of a check: per-file results, files skipped as optional-and-absent."""

    release: Release
    patch_set: PatchSet
    files: list[FileResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reverse: bool = False

    @property
    def hunks(self) -> list[HunkResult]:
        return [h for f in self.files for h in f.hunks]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    @property
    def already_applied(self) -> bool:
        return bool(self.hunks) and all(h.status == "applied" for h in self.hunks)

    def failures(self) -> list[HunkResult]:
        return [h for h in self.hunks if h.status != "ok"]

    def render(self) -> str:
        verb = "revert" if self.reverse else "apply"
        lines = [
            f"{self.release.root}: {self.release} (from {self.release.source})",
            f"patch set {self.patch_set.name} ({self.patch_set.engine} {self.patch_set.range_text}; "
            f"verified on {', '.join(self.patch_set.verified) or 'none'})",
        ]
        if self.patch_set.checked:
            lines.append(f"checked by hand on {'; '.join(self.patch_set.checked)}")
        lines += [f"  {h.describe()}" for h in self.hunks]
        lines += [f"  {path}: absent in this tree (optional), skipped" for path in self.skipped]
        if self.ok:
            lines.append(f"all {len(self.hunks)} hunks {verb} cleanly")
        elif self.already_applied:
            lines.append("already " + ("reverted" if self.reverse else "applied") + "; nothing to do")
        else:
            lines.append(f"{len(self.failures())} of {len(self.hunks)} hunks would not {verb}; nothing changed")
        return "\n".join(lines)


def _read(path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve(target, engine: Optional[str] = None, patches_root=None) -> tuple[Release, PatchSet]:
    """(release of the tree, its patch set). UnknownTreeError / NoPatchSetError otherwise."""
    release = detect_release(target, engine)
    return release, select_patch_set(release, load_patch_sets(patches_root))


def check_tree(release: Release, patch_set: PatchSet, *, reverse: bool = False) -> Report:
    """Every hunk's fate on this tree, computed in memory."""
    report = Report(release, patch_set, reverse=reverse)
    for file_patch in patch_set.file_patches():
        if reverse:
            file_patch = file_patch.reversed()
        text = _read(release.root / file_patch.path)
        if text is None and file_patch.path in patch_set.optional_files:
            report.skipped.append(file_patch.path)
            continue
        report.files.append(apply_file_patch(file_patch, text))
    return report


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _replace_all(root: Path, new_texts: dict[str, Optional[str]], old_texts: dict[str, Optional[str]]) -> None:
    """Write every file (None: delete); on any error put back those already written, re-raise."""
    done: list[str] = []
    try:
        for rel, text in new_texts.items():
            path = root / rel
            if text is None:
                if path.exists():
                    path.unlink()
            else:
                _write(path, text)
            done.append(rel)
    except BaseException:
        for rel in done:
            old = old_texts[rel]
            if old is None:
                (root / rel).unlink(missing_ok=True)
            else:
                _write(root / rel, old)
        raise


def apply_tree(release: Release, patch_set: PatchSet, *, dry_run: bool = False) -> Report:
    """Apply the patch set, all or nothing; returns the report (``dry_run``: write nothing).
    PatchError with the report's text when any hunk fails or the tree is already patched."""
    report = check_tree(release, patch_set)
    if not report.ok:
        raise PatchError(report.render())
    if dry_run:
        return report
    root = release.root
    state_dir = root / STATE_DIR
    if (state_dir / "state.json").exists():
        raise PatchError(f"{state_dir} exists: this tree was patched before; run 'revert' first")
    old_texts = {f.path: _read(root / f.path) for f in report.files}
    new_texts = {f.path: f.new_text for f in report.files}
    backup = state_dir / "backup"
    for rel, text in old_texts.items():
        if text is not None:
            (backup / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(backup / rel, "w", encoding="utf-8", newline="") as f:
                f.write(text)
    state = {
        "patch_set": patch_set.name,
        "engine": release.engine,
        "version": str(release.version),
        "files": {
            rel: {"original_sha256": None if old_texts[rel] is None else _sha(old_texts[rel]),
                  "patched_sha256": _sha(new_texts[rel])}
            for rel in new_texts
        },
    }
    try:
        _replace_all(root, new_texts, old_texts)
    except BaseException:
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    (state_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    return report


def revert_tree(release: Release, patch_set: PatchSet, *, dry_run: bool = False) -> Report:
    """Undo :func:`apply_tree` (or a hand-applied copy of the same patch set), all or nothing."""
    root = release.root
    state_path = root / STATE_DIR / "state.json"
    report = check_tree(release, patch_set, reverse=True)
    if state_path.exists():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("patch_set") != patch_set.name:
            raise PatchError(f"{state_path} records patch set {state.get('patch_set')!r}, not {patch_set.name!r}")
        backups: dict[str, Optional[str]] = {}
        for rel, sums in state["files"].items():
            current = _read(root / rel)
            if current is None or _sha(current) != sums["patched_sha256"]:
                backups = {}
                break  # edited since apply: reverse-apply the hunks instead
            backups[rel] = None if sums["original_sha256"] is None else _read(root / STATE_DIR / "backup" / rel)
        if backups:
            if not dry_run:
                _replace_all(root, backups, {rel: _read(root / rel) for rel in backups})
                shutil.rmtree(root / STATE_DIR)
            return _restored(report)
    if not report.ok:
        raise PatchError(report.render())
    if not dry_run:
        originals = {f.path: _read(root / f.path) for f in report.files}
        _replace_all(root, {f.path: f.new_text for f in report.files}, originals)
        shutil.rmtree(root / STATE_DIR, ignore_errors=True)
    return report


def _restored(report: Report) -> Report:
    """The report of a revert done from backups: every hunk counts as reverted."""
    for f in report.files:
        f.hunks = [HunkResult(h.path, h.index, "ok", line=h.line, reason="restored from backup") for h in f.hunks]
        f.new_text = f.new_text or ""
    return report


def is_patched(release: Release, patch_set: PatchSet) -> bool:
    """True when every hunk of the patch set is already in the tree."""
    return check_tree(release, patch_set).already_applied


__all__ = ["PatchError", "Report", "apply_tree", "check_tree", "is_patched", "resolve", "revert_tree"]
