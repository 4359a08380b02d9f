"""``muon-megatron patch``: carry muon-megatron's hook inside a Megatron or DeepSpeed tree.

    muon-megatron patch list
    muon-megatron patch check  --target PATH
    muon-megatron patch apply  --target PATH [--dry-run]
    muon-megatron patch revert --target PATH [--dry-run]

PATH is the root of the tree (the directory holding ``megatron/`` or ``deepspeed/``). The release is
read from the tree's version files, the patch set of its release line is chosen, and every hunk is
checked before anything is written. Exit status: 0 done (or nothing to do), 1 a hunk would fail
(nothing changed), 2 unknown tree or release (nothing changed).
"""

from __future__ import annotations

import argparse
import sys

from .patching import (
    NoPatchSetError, PatchError, UnknownTreeError, apply_tree, check_tree, load_patch_sets, resolve, revert_tree,
)
from .patching.release import ENGINES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "check", "apply", "revert"],
                        help="list the patch sets; check, apply or revert one on --target")
    parser.add_argument("--target", metavar="PATH", help="root of the Megatron-LM / megatron-core or DeepSpeed tree")
    parser.add_argument("--engine", choices=list(ENGINES), help="which engine, when PATH holds both")
    parser.add_argument("--dry-run", action="store_true", help="apply / revert: check and report, write nothing")
    parser.add_argument("--patches", metavar="DIR",
                        help="folder of patch sets (default: $MUON_MEGATRON_PATCHES, else patches/ of the checkout)")


def _list(args) -> int:
    for s in load_patch_sets(args.patches):
        files = sorted({fp.path for fp in s.file_patches()})
        print(f"{s.name}: {s.engine} {s.range_text}")
        print(f"  verified on: {', '.join(s.verified) or 'none'}")
        for path in files:
            optional = " (optional: skipped where absent)" if path in s.optional_files else ""
            print(f"  patches {path}{optional}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list(args)
    if not args.target:
        print(f"muon-megatron patch {args.action}: --target PATH is required", file=sys.stderr)
        return 2
    try:
        release, patch_set = resolve(args.target, args.engine, args.patches)
    except (UnknownTreeError, NoPatchSetError) as err:
        print(f"muon-megatron patch {args.action}: {err}", file=sys.stderr)
        return 2
    if args.action == "check":
        report = check_tree(release, patch_set)
        print(report.render())
        return 0 if report.ok or report.already_applied else 1
    operation = apply_tree if args.action == "apply" else revert_tree
    try:
        report = operation(release, patch_set, dry_run=args.dry_run)
    except PatchError as err:
        print(str(err), file=sys.stderr)
        state = check_tree(release, patch_set, reverse=args.action == "revert")
        return 0 if state.already_applied else 1
    print(report.render())
    if args.dry_run:
        print("dry run: nothing written")
    elif args.action == "apply":
        print(f"patched; originals kept in {release.root / '.muon-megatron-patch'} (revert with "
              f"'muon-megatron patch revert --target {args.target}')")
    else:
        print("reverted")
    return 0
