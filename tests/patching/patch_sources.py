"""Pristine engine sources from PyPI, downloaded once into a cache and unpacked.

Cache: ``$MUON_MEGATRON_PATCH_CACHE``, else ``~/.cache/muon-megatron/patch-sources``. Each release is
fetched with ``pip download --no-deps``: megatron-core as a wheel where PyPI has one (0.14 and
later; the .py files are the same for every Python tag), else as an sdist (0.12, 0.13); DeepSpeed
as its sdist. Tests that need a release skip, saying why, when it cannot be downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


#: Every release the tests apply a patch set to; each manifest's "verified" list must equal its share.
RELEASES = {
    "megatron-core": ("0.12.3", "0.13.1", "0.14.0", "0.15.3", "0.16.1", "0.17.1", "0.18.2", "0.19.2"),
    "deepspeed": ("0.14.5", "0.16.9", "0.17.5", "0.17.6", "0.18.9", "0.19.8"),
}
ALL_RELEASES = [(engine, version) for engine, versions in RELEASES.items() for version in versions]


def cache_dir() -> Path:
    env = os.environ.get("MUON_MEGATRON_PATCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "muon-megatron" / "patch-sources"


def _pip(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", "-d", str(cwd), *args], capture_output=True, text=True, timeout=300)


def _download(engine: str, version: str, into: Path) -> Path:
    """The downloaded archive; RuntimeError with pip's last words when every attempt fails."""
    spec = f"{engine}=={version}"
    if engine == "megatron-core":
        attempts = [["--only-binary", ":all:", "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", spec],
                    ["--no-binary", ":all:", spec]]
    else:  # DeepSpeed publishes sdists only; its setup.py needs torch, so use this environment's
        attempts = [["--no-binary", ":all:", "--no-build-isolation", spec]]
    last = ""
    for args in attempts:
        result = _pip(args, into)
        found = [p for p in into.iterdir() if p.name.lower().replace("_", "-").startswith(f"{engine}-{version}")]
        if result.returncode == 0 and found:
            return found[0]
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        last = last[0]
    raise RuntimeError(f"could not download {spec} from PyPI (network unavailable?): {last}")


def _unpack(archive: Path, dest: Path) -> Path:
    """The tree root (the directory holding megatron/ or deepspeed/)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest, members=[m for m in z.namelist() if m.startswith("megatron/")])
        return dest
    with tarfile.open(archive) as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(dest, filter="data")
        else:  # pragma: no cover - older Pythons
            t.extractall(dest)
    (top,) = [p for p in dest.iterdir() if p.is_dir()]
    return top


def pristine_tree(engine: str, version: str) -> Path:
    """Download (once) and unpack (once) one release; the returned tree must not be modified."""
    root = cache_dir()
    done = root / "trees" / f"{engine}-{version}"
    marker = done / ".complete"
    if marker.exists():
        return Path(marker.read_text().strip())
    archives = root / "archives" / f"{engine}-{version}"
    archives.mkdir(parents=True, exist_ok=True)
    existing = [p for p in archives.iterdir() if p.suffix in (".whl", ".gz")]
    archive = existing[0] if existing else _download(engine, version, archives)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
    tree = _unpack(archive, staging)
    shutil.rmtree(done, ignore_errors=True)
    done.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, done)
    tree = done / tree.relative_to(staging)
    marker.write_text(str(tree))
    return tree


