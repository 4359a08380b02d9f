"""Pieces of benchmarks/moonlight_mini_gpu.py that decide its headline number."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("moonlight_mini_gpu", ROOT / "benchmarks" / "moonlight_mini_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokens_to_reach_interpolates_between_evaluations(bench):
    curve = [(100, 3.0), (200, 2.0), (300, 1.0)]
    assert bench.tokens_to_reach(curve, 1.5) == pytest.approx(250)
    assert bench.tokens_to_reach(curve, 3.0) == 100
    assert bench.tokens_to_reach(curve, 0.5) is None


def test_validation_files_are_never_trained_on(bench):
    train, val, info = bench.stdlib_corpus(2_000_000, 0.05)
    assert info["val_files"] >= 1 and info["train_files"] > info["val_files"]
    probe = bytes(val[:4000].tolist())
    assert probe not in bytes(train.tolist())


def test_schedule_warms_up_then_decays_to_a_tenth(bench):
    lrs = [bench.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_the_torch_model_has_the_specs_parameter_count_and_routes_like_moonlight(bench):
    from muon_megatron.core import muon_param_groups
    from muon_megatron.models import MOONLIGHT_MINI, count_params
    from muon_megatron.models.torch_model import MoonlightModel

    model = MoonlightModel(MOONLIGHT_MINI)
    assert sum(p.numel() for p in model.parameters()) == count_params(MOONLIGHT_MINI).total
    groups = muon_param_groups(model)
    adamw = [n for g in groups if not g["use_muon"] for n in g["names"]]
    assert "embedding.weight" in adamw and "output_layer.weight" in adamw
    assert all(n.endswith("weight") for n in adamw)
    muon = [n for g in groups if g["use_muon"] for n in g["names"]]
    assert "layers.1.mlp.router.weight" in muon and "layers.1.mlp.expert_gate_proj" in muon
