"""Fixtures of the patching tests: pristine releases from PyPI (see :mod:`patch_sources`)."""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from patch_sources import ALL_RELEASES, pristine_tree  # noqa: E402


@pytest.fixture(scope="session")
def sources() -> dict:
    """``{(engine, version): Path or the download error text}`` for :data:`ALL_RELEASES`."""
    def fetch(key):
        try:
            return key, pristine_tree(*key)
        except Exception as err:  # noqa: BLE001 - reported by the tests that need it
            return key, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(fetch, ALL_RELEASES))


@pytest.fixture
def tree_copy(sources, tmp_path):
    """``tree_copy(engine, version)``: a writable copy of a pristine release (skips if unavailable)."""
    def make(engine: str, version: str) -> Path:
        src = sources[(engine, version)]
        if not isinstance(src, Path):
            pytest.skip(src)
        dest = tmp_path / f"{engine}-{version}"
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        return dest

    return make
