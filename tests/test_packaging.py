"""What the wheel ships: every package of ``muon_megatron/`` and the patch sets (a regression: the
patch sets of ``patches/`` were not in the wheel, so ``muon-megatron patch`` found none there)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _listed_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_pyproject_lists_every_package_of_the_source_tree():
    found = sorted(
        ".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "muon_megatron").rglob("__init__.py")
        if "__pycache__" not in path.parts
    )
    listed = _listed_packages()
    assert sorted(p for p in listed if p != "muon_megatron.patch_sets") == found


def test_wheel_ships_the_patch_sets_and_finds_them_installed(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("muon_megatron-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for manifest in (ROOT / "patches").glob("*/patchset.json"):
        folder = manifest.parent.name
        for path in manifest.parent.iterdir():
            assert f"muon_megatron/patch_sets/{folder}/{path.name}" in names, path.name
    # unpacked like an installation, the patch code looks there
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from muon_megatron.patching.patchsets import default_patch_root, load_patch_sets; "
            "print(default_patch_root()); print(len(load_patch_sets()))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    root, count = out.stdout.split()
    assert root == str(site / "muon_megatron" / "patch_sets")
    assert int(count) == len(list((ROOT / "patches").glob("*/patchset.json")))
