"""Each patch set applies cleanly to the pristine PyPI source of every release it names as
verified, reverts to the identical bytes, and leaves files that still compile."""

from __future__ import annotations

import filecmp
import py_compile
import shutil
import subprocess

import pytest
from patch_sources import ALL_RELEASES, RELEASES

from muon_megatron.patching import apply_tree, check_tree, load_patch_sets, resolve, revert_tree
from muon_megatron.patching.unidiff import parse_patch


def test_manifests_name_exactly_the_releases_these_tests_verify():
    verified = {}
    for patch_set in load_patch_sets():
        verified.setdefault(patch_set.engine, []).extend(patch_set.verified)
    assert {e: sorted(v) for e, v in verified.items()} == {e: sorted(v) for e, v in RELEASES.items()}


@pytest.mark.parametrize("engine,version", ALL_RELEASES, ids=[f"{e}-{v}" for e, v in ALL_RELEASES])
def test_patch_set_applies_cleanly_and_reverts_to_pristine_bytes(engine, version, tree_copy, sources):
    tree = tree_copy(engine, version)
    release, patch_set = resolve(tree)
    assert (release.engine, str(release.version)) == (engine, version)
    assert version in patch_set.verified

    report = check_tree(release, patch_set)
    assert report.ok, report.render()
    assert all(h.status == "ok" for h in report.hunks)

    if shutil.which("git"):  # the same diffs work with plain `git apply` from the tree's root (docs/patches.md)
        present = [str(p) for p in patch_set.patch_files  # leave out diffs of optional files absent here
                   if all((tree / fp.path).exists() for fp in parse_patch(p.read_text()))]
        git = subprocess.run(["git", "apply", "--check", *present], cwd=tree, capture_output=True, text=True)
        assert git.returncode == 0, git.stderr

    apply_tree(release, patch_set)
    for f in report.files:
        py_compile.compile(str(tree / f.path), doraise=True)
    again = check_tree(release, patch_set)
    assert again.already_applied, again.render()

    revert_tree(release, patch_set)
    pristine = sources[(engine, version)]
    for f in report.files:
        assert filecmp.cmp(tree / f.path, pristine / f.path, shallow=False), f.path
    assert not (tree / ".muon-megatron-patch").exists()


def test_megatron_training_hunks_apply_where_the_wheel_carries_megatron_training(tree_copy):
    """0.17-0.19 wheels carry megatron/training/arguments.py: its hunks apply there; 0.16's has none."""
    for version, expected in (("0.16.1", False), ("0.17.1", True), ("0.19.2", True)):
        release, patch_set = resolve(tree_copy("megatron-core", version))
        report = check_tree(release, patch_set)
        patched = {f.path for f in report.files}
        assert ("megatron/training/arguments.py" in patched) is expected, version
        assert ("megatron/training/arguments.py" in report.skipped) is not expected, version
