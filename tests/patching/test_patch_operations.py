"""The diff engine, release detection, selection, and all-or-nothing apply / revert on small
synthetic trees (no network, no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muon_megatron import cli
from muon_megatron.patching import (
    NoPatchSetError, PatchError, UnknownTreeError, apply_tree, check_tree, detect_release, load_patch_sets, resolve,
    revert_tree,
)
from muon_megatron.patching import hooks
from muon_megatron.patching.unidiff import PatchFormatError, apply_file_patch, parse_patch

PATCH = """\
--- a/pkg/mod.py
+++ b/pkg/mod.py
@@ -2,3 +2,4 @@ def f():
 a = 1
 b = 2
+inserted = True
 c = 3
@@ -8,2 +9,2 @@ def g():
 x = 1
-y = 2
+y = 20
"""
ORIGINAL = "head\na = 1\nb = 2\nc = 3\nfiller\nfiller2\nfiller3\nx = 1\ny = 2\ntail\n"


def _file_patch():
    (fp,) = parse_patch(PATCH)
    return fp


def test_hunks_apply_at_their_lines():
    result = apply_file_patch(_file_patch(), ORIGINAL)
    assert result.ok and [h.status for h in result.hunks] == ["ok", "ok"]
    expected = ORIGINAL.replace("b = 2\n", "b = 2\ninserted = True\n").replace("y = 2\n", "y = 20\n")
    assert result.new_text == expected


def test_hunks_apply_with_an_offset_and_report_it():
    result = apply_file_patch(_file_patch(), "new line\nnew line 2\n" + ORIGINAL)
    assert result.ok
    assert [(h.line, h.offset) for h in result.hunks] == [(4, 2), (10, 2)]


def test_a_changed_context_line_fails_with_the_line_that_differs():
    result = apply_file_patch(_file_patch(), ORIGINAL.replace("b = 2", "b = 3"))
    assert not result.ok and result.new_text is None
    first = result.hunks[0]
    assert first.status == "fails"
    assert "line 3" in first.reason and "expected 'b = 2', found 'b = 3'" in first.reason
    assert result.hunks[1].status == "ok"  # each hunk is reported, not just the first failure


def test_an_applied_patch_is_recognised_and_reverses_to_the_original():
    patched = apply_file_patch(_file_patch(), ORIGINAL).new_text
    again = apply_file_patch(_file_patch(), patched)
    assert [h.status for h in again.hunks] == ["applied", "applied"]
    assert apply_file_patch(_file_patch().reversed(), patched).new_text == ORIGINAL


def test_crlf_files_keep_their_line_endings():
    crlf = ORIGINAL.replace("\n", "\r\n")
    result = apply_file_patch(_file_patch(), crlf)
    assert result.ok and "inserted = True\r\n" in result.new_text and "\n" not in result.new_text.replace("\r\n", "")


def test_malformed_patches_are_refused():
    with pytest.raises(PatchFormatError):
        parse_patch("not a diff")
    with pytest.raises(PatchFormatError, match="ends early"):
        parse_patch("--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n")


# ------------------------------------------------------------------------------- trees on disk


def _megatron_tree(root: Path, minor: int, optimizer_text: str) -> Path:
    (root / "megatron" / "core" / "optimizer").mkdir(parents=True)
    info = f"MAJOR = 0\nMINOR = {minor}\nPATCH = 1\nPRE_RELEASE = ''\n"
    (root / "megatron" / "core" / "package_info.py").write_text(info)
    (root / "megatron" / "core" / "optimizer" / "__init__.py").write_text(optimizer_text)
    return root


def _patches(root: Path, files: dict) -> Path:
    """A patches/ folder with one set for megatron-core 0.16-0.19 holding ``files`` (name -> diff)."""
    folder = root / "megatron-core-test"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "patchset.json").write_text(json.dumps({
        "engine": "megatron-core", "versions": [">=0.16.0", "<0.20.0"], "verified": ["0.16.1"],
        "patches": list(files), "optional_files": ["megatron/training/arguments.py"],
    }))
    return root


OPT = "def get_megatron_optimizer(config):\n    return 1\n\nother = 2\n"
OPT_PATCH = """\
--- a/megatron/core/optimizer/__init__.py
+++ b/megatron/core/optimizer/__init__.py
@@ -1,2 +1,3 @@
 def get_megatron_optimizer(config):
+    hooked = True
     return 1
"""
SECOND_PATCH = """\
--- a/megatron/core/package_info.py
+++ b/megatron/core/package_info.py
@@ -1,2 +1,3 @@
 MAJOR = 0
+# patched
 MINOR = 16
"""


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_apply_then_revert_restores_every_byte_and_removes_the_backup(tmp_path):
    tree = _megatron_tree(tmp_path / "tree", 16, OPT)
    patches = _patches(tmp_path / "patches", {"a.patch": OPT_PATCH, "b.patch": SECOND_PATCH})
    before = _snapshot(tree)
    release, patch_set = resolve(tree, patches_root=patches)
    apply_tree(release, patch_set)
    assert "hooked = True" in (tree / "megatron/core/optimizer/__init__.py").read_text()
    with pytest.raises(PatchError, match="already applied"):
        apply_tree(release, patch_set)
    revert_tree(release, patch_set)
    assert _snapshot(tree) == before


def test_one_failing_hunk_changes_no_file(tmp_path):
    tree = _megatron_tree(tmp_path / "tree", 16, OPT)
    (tree / "megatron/core/package_info.py").write_text("MAJOR = 0\n\nMINOR = 16\nPATCH = 1\n")  # breaks b.patch only
    patches = _patches(tmp_path / "patches", {"a.patch": OPT_PATCH, "b.patch": SECOND_PATCH})
    before = _snapshot(tree)
    release, patch_set = resolve(tree, patches_root=patches)
    with pytest.raises(PatchError) as err:
        apply_tree(release, patch_set)
    assert "megatron/core/package_info.py hunk 1: FAILS" in str(err.value)
    assert "megatron/core/optimizer/__init__.py hunk 1: applies at line 1" in str(err.value)
    assert _snapshot(tree) == before


def test_a_write_error_midway_restores_the_files_already_written(tmp_path, monkeypatch):
    tree = _megatron_tree(tmp_path / "tree", 16, OPT)
    patches = _patches(tmp_path / "patches", {"a.patch": OPT_PATCH, "b.patch": SECOND_PATCH})
    before = _snapshot(tree)
    from muon_megatron.patching import operations

    real_write, calls = operations._write, []

    def failing_write(path, text):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, text)

    monkeypatch.setattr(operations, "_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        apply_tree(*resolve(tree, patches_root=patches))
    assert _snapshot(tree) == before


def test_revert_after_an_edit_elsewhere_in_the_file_reverse_applies_the_hunks(tmp_path):
    tree = _megatron_tree(tmp_path / "tree", 16, OPT)
    patches = _patches(tmp_path / "patches", {"a.patch": OPT_PATCH})
    release, patch_set = resolve(tree, patches_root=patches)
    apply_tree(release, patch_set)
    path = tree / "megatron/core/optimizer/__init__.py"
    path.write_text(path.read_text() + "edited = True\n")  # the fork's own change after patching
    revert_tree(release, patch_set)
    assert path.read_text() == OPT + "edited = True\n"


def test_a_committed_patch_without_backup_still_reverts(tmp_path):
    tree = _megatron_tree(tmp_path / "tree", 16, OPT)
    patches = _patches(tmp_path / "patches", {"a.patch": OPT_PATCH})
    release, patch_set = resolve(tree, patches_root=patches)
    apply_tree(release, patch_set)
    import shutil

    shutil.rmtree(tree / ".muon-megatron-patch")  # as in a fork that committed the patched file
    revert_tree(release, patch_set)
    assert (tree / "megatron/core/optimizer/__init__.py").read_text() == OPT


def test_optional_file_absent_is_skipped_and_reported(tmp_path):
    tree = _megatron_tree(tmp_path / "tree", 16, OPT)
    training = OPT_PATCH.replace("megatron/core/optimizer/__init__.py", "megatron/training/arguments.py")
    patches = _patches(tmp_path / "patches", {"a.patch": OPT_PATCH, "t.patch": training})
    report = check_tree(*resolve(tree, patches_root=patches))
    assert report.ok and report.skipped == ["megatron/training/arguments.py"]
    assert "absent in this tree (optional), skipped" in report.render()


def test_unknown_release_gets_a_clear_message_and_no_change(tmp_path):
    tree = _megatron_tree(tmp_path / "tree", 11, OPT)
    before = _snapshot(tree)
    with pytest.raises(NoPatchSetError, match=r"no patch set for megatron-core 0\.11\.1.*Nothing was changed"):
        resolve(tree)
    assert cli.main(["patch", "apply", "--target", str(tree)]) == 2
    assert _snapshot(tree) == before


def test_a_directory_without_an_engine_is_not_a_tree(tmp_path):
    with pytest.raises(UnknownTreeError, match="is not an engine tree"):
        detect_release(tmp_path)


def test_deepspeed_release_is_read_from_version_txt_or_the_installed_info(tmp_path):
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "__init__.py").write_text("")
    (tmp_path / "deepspeed" / "git_version_info_installed.py").write_text("version='0.18.9'\ngit_hash='abc'\n")
    assert str(detect_release(tmp_path).version) == "0.18.9"
    (tmp_path / "version.txt").write_text("0.17.5\n")
    release = detect_release(tmp_path / "deepspeed")  # the package directory works too
    assert (release.engine, str(release.version), release.source) == ("deepspeed", "0.17.5", "version.txt")


def test_shipped_patch_sets_cover_disjoint_lines_and_call_only_existing_hooks():
    sets = load_patch_sets()
    assert {s.name for s in sets} == {
        "megatron-core-0.12-0.15", "megatron-core-0.16-0.19", "megatron-core-0.20", "deepspeed-0.14-0.17.5", "deepspeed-0.17.6-0.19",
    }
    for s in sets:
        assert (s.folder / "README.md").is_file(), s.name
        for fp in s.file_patches():
            added = "\n".join(line[1:] for h in fp.hunks for line in h.lines if line[0] == "+")
            assert "muon_megatron" in added
            for name in ("get_megatron_muon_optimizer", "add_muon_arguments", "validate_muon_args",
                         "deepspeed_selects_muon", "deepspeed_initialize"):
                if name in added:
                    assert callable(getattr(hooks, name))
            assert not any(line[0] == "-" for h in fp.hunks for line in h.lines)  # hooks only add lines


def test_cli_check_exit_status_and_dry_run_writes_nothing(tmp_path, capsys):
    tree = _megatron_tree(tmp_path / "tree", 16, OPT)
    patches = _patches(tmp_path / "patches", {"a.patch": OPT_PATCH})
    before = _snapshot(tree)
    assert cli.main(["patch", "check", "--target", str(tree), "--patches", str(patches)]) == 0
    assert cli.main(["patch", "apply", "--target", str(tree), "--patches", str(patches), "--dry-run"]) == 0
    assert "dry run: nothing written" in capsys.readouterr().out
    assert _snapshot(tree) == before
    (tree / "megatron/core/optimizer/__init__.py").write_text("changed\n")
    assert cli.main(["patch", "check", "--target", str(tree), "--patches", str(patches)]) == 1
    assert cli.main(["patch", "list"]) == 0


def test_patching_imports_the_standard_library_only_except_hooks_which_reach_engines_through_adapters():
    import ast
    import sys

    folder = Path(hooks.__file__).parent
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("."):
                    allowed = name.lstrip(".").split(".")[0] in {"operations", "patchsets", "release", "unidiff", ""}
                    if path.name == "hooks.py":
                        allowed = allowed or name in ("..megatron.config", "..megatron.arguments",
                                                      "..megatron.factory", "..deepspeed.config",
                                                      "..deepspeed.activation")
                    assert allowed, f"{path.name} imports {name}"
                else:
                    top = name.split(".")[0]
                    assert top in sys.stdlib_module_names or (path.name == "hooks.py" and name == "megatron.core"), (
                        f"{path.name} imports {name}"
                    )


def test_deepspeed_hook_selects_type_muon_from_every_config_form_and_not_its_own_inner_call(tmp_path, monkeypatch):
    from types import SimpleNamespace

    muon = {"optimizer": {"type": "Muon", "params": {"lr": 1e-3}}}
    builtin = {"optimizer": {"type": "muon", "params": {"implementation": "deepspeed"}}}
    adam = {"optimizer": {"type": "AdamW"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(muon))
    assert hooks.deepspeed_selects_muon({"config": muon})
    assert hooks.deepspeed_selects_muon({"config": None, "config_params": str(path)})
    assert hooks.deepspeed_selects_muon({"args": SimpleNamespace(deepspeed_config=str(path))})
    # the built-in Muon also goes through muon_megatron, which removes the "implementation" key
    assert hooks.deepspeed_selects_muon({"config": builtin})
    assert not hooks.deepspeed_selects_muon({"config": adam})
    assert not hooks.deepspeed_selects_muon({"config": None})

    seen = []

    def fake_initialize(**call):
        seen.append(hooks.deepspeed_selects_muon(call))  # the inner deepspeed.initialize: DeepSpeed's own code
        return "engine"

    import muon_megatron.deepspeed.activation as activation

    monkeypatch.setattr(activation, "initialize", fake_initialize)
    assert hooks.deepspeed_initialize({"config": muon, "model": None}) == "engine"
    assert seen == [False]
    assert hooks.deepspeed_selects_muon({"config": muon})  # the guard is released afterwards
