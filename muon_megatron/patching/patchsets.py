"""The patch sets in ``patches/``: one folder per engine and release line, found by its manifest.

Each folder holds a ``patchset.json``::

    {
      "engine": "megatron-core",               # or "deepspeed"
      "versions": [">=0.16.0", "<0.20.0"],      # the release line (patch number included)
      "verified": ["0.16.1", "0.19.2"],         # releases the tests apply it to
      "checked": ["Megatron-LM main abc123"],   # optional: trees checked by hand, not in CI
      "patches": ["get_megatron_optimizer.patch", "training_arguments.patch"],
      "optional_files": ["megatron/training/arguments.py"]
    }

``patches`` are unified diffs (paths relative to the tree root, ``a/`` ``b/`` prefixes), applied in
order. A file listed in ``optional_files`` may be absent from a tree (megatron-core 0.16 wheels have
no ``megatron/training``): its hunks are then skipped, and the report says so.

To add a release line: make a folder with the manifest, its diffs and a README (see
``docs/patches.md``, "Regenerating a patch"); nothing in this module changes.

Where the folders are looked for: ``$MUON_MEGATRON_PATCHES`` if set; else ``muon_megatron/patch_sets``
in an installed wheel (the build ships the repository's ``patches/`` there, see ``pyproject.toml``);
else ``patches/`` next to the ``muon_megatron`` package (a source checkout).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .release import ENGINES, Release, Version
from .unidiff import FilePatch, parse_patch

MANIFEST = "patchset.json"


class NoPatchSetError(LookupError):
    """No patch set covers a release."""


@dataclass(frozen=True)
class PatchSet:
    """One folder of ``patches/``."""

    name: str
    """The folder name, e.g. ``megatron-core-0.16-0.19``."""
    folder: Path
    engine: str
    lowest: Version
    """Lowest release covered (inclusive)."""
    below: Version
    """First release not covered (exclusive)."""
    verified: tuple[str, ...]
    patch_files: tuple[Path, ...]
    optional_files: frozenset
    checked: tuple[str, ...] = ()
    """Source trees the set was checked on by hand (e.g. a development branch at a commit), which
    the tests cannot download; free text, shown beside ``verified``."""

    def covers(self, release: Release) -> bool:
        return release.engine == self.engine and self.lowest.numbers <= release.version.numbers < self.below.numbers

    @property
    def range_text(self) -> str:
        low, high = self.lowest, self.below
        return f">={low.major}.{low.minor}.{low.patch}, <{high.major}.{high.minor}.{high.patch}"

    def file_patches(self) -> list[FilePatch]:
        patches: list[FilePatch] = []
        for path in self.patch_files:
            patches.extend(parse_patch(path.read_text(encoding="utf-8")))
        return patches


def default_patch_root() -> Path:
    """Where the patch-set folders are (see the module docstring)."""
    env = os.environ.get("MUON_MEGATRON_PATCHES")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    installed = package / "patch_sets"
    return installed if installed.is_dir() else package.parent / "patches"


def _bound(spec: str, op: str) -> Version:
    return Version.parse(spec[len(op):])


def load_patch_set(folder: Path) -> PatchSet:
    """Read one folder's manifest; ValueError naming the folder and the bad field."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    engine = manifest.get("engine")
    if engine not in ENGINES:
        raise ValueError(f"{folder / MANIFEST}: engine must be one of {list(ENGINES)}, not {engine!r}")
    lowest = below = None
    for spec in manifest.get("versions", []):
        if spec.startswith(">="):
            lowest = _bound(spec, ">=")
        elif spec.startswith("<"):
            below = _bound(spec, "<")
        else:
            raise ValueError(f"{folder / MANIFEST}: versions entries are '>=X.Y.Z' or '<X.Y.Z', not {spec!r}")
    if lowest is None or below is None:
        raise ValueError(f"{folder / MANIFEST}: versions needs both a '>=' and a '<' bound")
    files = tuple(folder / name for name in manifest.get("patches", []))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise ValueError(f"{folder / MANIFEST}: patches missing or empty: {missing or '[]'}")
    return PatchSet(
        name=folder.name, folder=folder, engine=engine, lowest=lowest, below=below,
        verified=tuple(manifest.get("verified", [])), patch_files=files,
        optional_files=frozenset(manifest.get("optional_files", [])),
        checked=tuple(manifest.get("checked", [])),
    )


def load_patch_sets(root: Optional[Path] = None) -> list[PatchSet]:
    """Every patch set under ``root`` (default :func:`default_patch_root`), sorted by engine and
    release. Overlapping ranges for one engine are an error."""
    root = Path(root) if root is not None else default_patch_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"no patch sets at {root}: set MUON_MEGATRON_PATCHES to the patches/ folder of a muon-megatron checkout"
        )
    sets = sorted(
        (load_patch_set(d) for d in root.iterdir() if (d / MANIFEST).is_file()),
        key=lambda s: (s.engine, s.lowest.numbers),
    )
    for a, b in zip(sets, sets[1:]):
        if a.engine == b.engine and b.lowest.numbers < a.below.numbers:
            raise ValueError(f"patch sets {a.name} and {b.name} cover overlapping {a.engine} releases")
    return sets


def select_patch_set(release: Release, sets: Sequence[PatchSet]) -> PatchSet:
    """The patch set covering ``release``; NoPatchSetError listing what exists otherwise."""
    for patch_set in sets:
        if patch_set.covers(release):
            return patch_set
    known = "; ".join(f"{s.name} ({s.engine} {s.range_text})" for s in sets if s.engine == release.engine)
    raise NoPatchSetError(
        f"no patch set for {release.engine} {release.version} (read from {release.source}). "
        f"Patch sets for {release.engine}: {known or 'none'}. Nothing was changed. For a new release, regenerate "
        "a patch as docs/patches.md describes, or use the runtime activation "
        "(muon_megatron.megatron.install() / muon_megatron.deepspeed.install()) instead."
    )
