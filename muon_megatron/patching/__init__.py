"""Patch sets for forks: carry ``--optimizer muon`` / ``"type": "muon"`` inside a Megatron or
DeepSpeed tree, as a small readable diff that calls into ``muon_megatron``.

- :mod:`.release`: which engine and release a tree holds (from its version files);
- :mod:`.patchsets`: the folders of ``patches/`` and which one covers a release;
- :mod:`.unidiff`: unified diffs parsed and applied in Python (exact context, nearest offset);
- :mod:`.operations`: ``check`` / ``apply`` / ``revert``, all or nothing, with backups;
- :mod:`.hooks`: the functions the patched engines call (stable names: forks depend on them).

The command line is ``muon-megatron patch`` (:mod:`muon_megatron.patch_cli`). Imports the standard
library only, except :mod:`.hooks`, which imports the engine adapters when a patched engine calls it.
"""

from .operations import PatchError, Report, apply_tree, check_tree, resolve, revert_tree
from .patchsets import NoPatchSetError, PatchSet, load_patch_sets, select_patch_set
from .release import Release, UnknownTreeError, Version, detect_release

__all__ = [
    "NoPatchSetError", "PatchError", "PatchSet", "Release", "Report", "UnknownTreeError", "Version", "apply_tree",
    "check_tree", "detect_release", "load_patch_sets", "resolve", "revert_tree", "select_patch_set",
]
