"""Which engine and release a source tree holds, read from its version files (never imported).

A tree is a directory holding the engine's top-level package: a Megatron-LM or DeepSpeed checkout,
an unpacked sdist or wheel, or a vendored copy. Version files read:

- megatron-core: ``megatron/core/package_info.py`` (``MAJOR``, ``MINOR``, ``PATCH``, ``PRE_RELEASE``);
- DeepSpeed: ``version.txt`` at the root (checkouts, sdists), else
  ``deepspeed/git_version_info_installed.py`` (installed copies), else a literal ``version = '...'``
  in ``deepspeed/git_version_info.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ENGINES = ("megatron-core", "deepspeed")


class UnknownTreeError(ValueError):
    """The path holds no engine tree whose release can be read."""


@dataclass(frozen=True, order=True)
class Version:
    """A release number; pre-release and local tags are kept as text and ignored in comparisons
    with version ranges (``0.16.0rc1`` belongs to the 0.16 line)."""

    major: int
    minor: int
    patch: int = 0
    tag: str = ""

    @classmethod
    def parse(cls, text: str) -> "Version":
        match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?(.*)$", str(text))
        if not match:
            raise ValueError(f"not a release number: {text!r}")
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0), match.group(4).strip())

    @property
    def numbers(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}{self.tag}"


@dataclass(frozen=True)
class Release:
    """An engine tree: ``root`` holds ``megatron/`` or ``deepspeed/``."""

    engine: str
    version: Version
    root: Path
    source: str
    """The file the version was read from, relative to ``root``."""

    def __str__(self) -> str:
        return f"{self.engine} {self.version}"


def _megatron_version(root: Path) -> Optional[tuple[Version, str]]:
    rel = "megatron/core/package_info.py"
    path = root / rel
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    fields = {}
    for key in ("MAJOR", "MINOR", "PATCH"):
        match = re.search(rf"^{key}\s*=\s*(\d+)", text, re.MULTILINE)
        if not match:
            raise UnknownTreeError(f"{path}: no {key} = <number> line; cannot tell the megatron-core release")
        fields[key] = int(match.group(1))
    pre = re.search(r"^PRE_RELEASE\s*=\s*['\"]([^'\"]*)['\"]", text, re.MULTILINE)
    return Version(fields["MAJOR"], fields["MINOR"], fields["PATCH"], pre.group(1) if pre else ""), rel


def _deepspeed_version(root: Path) -> Optional[tuple[Version, str]]:
    if not (root / "deepspeed" / "__init__.py").is_file():
        return None
    candidates = [
        ("version.txt", None),
        ("deepspeed/git_version_info_installed.py", r"^version\s*=\s*['\"]([^'\"]+)['\"]"),
        ("deepspeed/git_version_info.py", r"^\s*version\s*=\s*['\"](\d[^'\"]*)['\"]"),
    ]
    for rel, pattern in candidates:
        path = root / rel
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        value = text.strip() if pattern is None else None
        if pattern is not None:
            match = re.search(pattern, text, re.MULTILINE)
            value = match.group(1) if match else None
        if value and value != "0.0.0":
            try:
                return Version.parse(value), rel
            except ValueError:
                continue
    raise UnknownTreeError(
        f"{root} holds deepspeed/ but no readable release number (looked at version.txt, "
        "deepspeed/git_version_info_installed.py, deepspeed/git_version_info.py)"
    )


_READERS = {"megatron-core": _megatron_version, "deepspeed": _deepspeed_version}


def detect_release(path, engine: Optional[str] = None) -> Release:
    """The engine and release of the tree at ``path`` (its root, or its ``megatron`` /
    ``deepspeed`` package directory). ``engine`` picks one when the directory holds both.
    UnknownTreeError, saying what was looked for, when nothing is found."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise UnknownTreeError(f"{path} is not a directory")
    if (root.name == "megatron" and (root / "core" / "package_info.py").is_file()) or (
        root.name == "deepspeed" and (root / "__init__.py").is_file()
    ):
        root = root.parent  # the package directory itself was given
    if engine is not None and engine not in ENGINES:
        raise UnknownTreeError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    found = {}
    for name, reader in _READERS.items():
        if engine is not None and name != engine:
            continue
        result = reader(root)
        if result is not None:
            found[name] = result
    if not found:
        wanted = " or ".join(
            {"megatron-core": "megatron/core/package_info.py", "deepspeed": "deepspeed/__init__.py"}[e]
            for e in ([engine] if engine else ENGINES)
        )
        raise UnknownTreeError(f"{root} is not an engine tree: found no {wanted}")
    if len(found) > 1:
        raise UnknownTreeError(f"{root} holds both megatron/ and deepspeed/; pass --engine to choose one")
    (name, (version, source)), = found.items()
    return Release(name, version, root, source)
