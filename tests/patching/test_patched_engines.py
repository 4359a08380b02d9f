"""Patched engines import, and a short CPU run through the engine's own entry point gives exactly
the plugin's numbers.

Each check runs ``engine_runs.py`` in a fresh process whose PYTHONPATH starts with the patched tree
(never the environment's site-packages). A megatron-core run needs the environment's installed
megatron-core dependencies to fit the tree, so each run names the installed line it needs:
megatron-core 0.15.3 and 0.16.1 run in the Python 3.11 environment (megatron-core 0.16.1
installed), 0.19.2 in the Python 3.12 one. Releases 0.17+ need Python 3.12.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from muon_megatron.patching import apply_tree, resolve

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _installed(dist: str):
    try:
        return tuple(int(x) for x in metadata.version(dist).split(".")[:2])
    except metadata.PackageNotFoundError:
        return None


def _patched(tree_copy, engine, version) -> Path:
    tree = tree_copy(engine, version)
    apply_tree(*resolve(tree))
    return tree


def _run(mode: str, tree: Path, timeout: int = 240, env_extra=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(ROOT)])
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(HERE / "engine_runs.py"), mode, str(tree)], env=env, cwd=str(tree),
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0 and lines, f"{mode} failed (rc {proc.returncode}):\n{output}"
    return json.loads(lines[-1])


needs_megatron_training = pytest.mark.skipif(
    _installed("megatron-core") != (0, 19), reason="megatron/training runs where megatron-core 0.19 is installed"
)

# Importable with Python 3.11 and 3.12 alike; 0.17+ require 3.12.
MEGATRON_IMPORTS = ["0.12.3", "0.13.1", "0.14.0"] + (["0.17.1", "0.18.2"] if sys.version_info >= (3, 12) else [])


@pytest.mark.skipif(_installed("megatron-core") is None, reason="megatron-core's dependencies are not installed")
@pytest.mark.parametrize("version", MEGATRON_IMPORTS)
def test_patched_megatron_core_imports(version, tree_copy):
    out = _run("megatron-import", _patched(tree_copy, "megatron-core", version))
    assert out == {"patched": True, "hook": True}


# (release, installed megatron-core line whose dependencies it runs with)
MEGATRON_RUNS = [("0.15.3", (0, 16)), ("0.16.1", (0, 16)), ("0.19.2", (0, 19))]


@pytest.mark.parametrize("version,needs", MEGATRON_RUNS, ids=[v for v, _ in MEGATRON_RUNS])
def test_patched_get_megatron_optimizer_with_optimizer_muon_equals_get_muon_optimizer(version, needs, tree_copy):
    if _installed("megatron-core") != needs:
        pytest.skip(f"megatron-core {version} runs where megatron-core {needs[0]}.{needs[1]} is installed")
    # 0.15 is below the adapter's tested range; the installed 0.16 metadata would hide that.
    tree = _patched(tree_copy, "megatron-core", version)
    out = _run("megatron-run", tree, env_extra={"MUON_MEGATRON_ALLOW_UNTESTED": "1"})
    assert out["patched"]
    for layout in ("replicated", "distopt"):
        assert out[layout]["engine_inner"] == ["MegatronMuon"] == out[layout]["plugin_inner"]
        assert out[layout]["max_abs_diff"] == 0.0, out
        assert out[layout]["moved"] > 1e-3  # the steps did something


def test_patched_megatron_core_0_14_says_the_adapter_needs_0_15(tree_copy):
    if _installed("megatron-core") != (0, 16):
        pytest.skip("runs in the environment with megatron-core 0.16 installed")
    tree = _patched(tree_copy, "megatron-core", "0.14.0")
    with pytest.raises(AssertionError, match="needs megatron-core >= 0.15"):
        _run("megatron-run", tree)


@needs_megatron_training
def test_patched_training_arguments_parse_muon_flags_with_moonlight_defaults(tree_copy):
    out = _run("megatron-args", _patched(tree_copy, "megatron-core", "0.19.2"))
    assert out == {"patched": True, "optimizer": "muon", "ns_dtype": "float32", "momentum": 0.9,
                   "default_momentum": 0.95, "default_nesterov": True, "default_scale": "moonlight",
                   "validate_routed": True}


@needs_megatron_training
def test_patched_pretrain_with_optimizer_muon_needs_no_install_and_loss_falls(tree_copy):
    out = _run("megatron-pretrain", _patched(tree_copy, "megatron-core", "0.19.2"), timeout=300)
    for rank in out["results"]:
        assert rank["patched"] and rank["optimizer"] == "muon"
        assert rank["wrappers"] == [["MuonDistributedOptimizer", "MegatronMuon"]]
        losses = rank["losses"]
        assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses


needs_deepspeed = pytest.mark.skipif(
    _installed("deepspeed") is None, reason="deepspeed's dependencies are not installed"
)


@needs_deepspeed
@pytest.mark.parametrize("version", ["0.14.5", "0.16.9", "0.17.6", "0.18.9"])
def test_patched_deepspeed_imports(version, tree_copy):
    out = _run("deepspeed-import", _patched(tree_copy, "deepspeed", version))
    assert out["patched"] and out["hook"] and out["version"].strip() == version


@needs_deepspeed
@pytest.mark.parametrize("version", ["0.17.5", "0.19.8"])
def test_patched_deepspeed_initialize_type_muon_equals_muon_megatron_initialize(version, tree_copy):
    out = _run("deepspeed-run", _patched(tree_copy, "deepspeed", version))
    assert out["patched"]
    for stage in ("stage0", "stage1"):
        assert out[stage]["engine_optimizer"] == "DeepSpeedMuon" == out[stage]["plugin_optimizer"]
        assert out[stage]["max_abs_diff"] == 0.0, out
        assert out[stage]["moved"] > 1e-3
