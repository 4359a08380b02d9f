"""Moonlight built by megatron-core from our config: its parameters are the ones ``weights(spec)``
lists (names, shapes, counts), on the meta device so that 16 B parameters cost no memory."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("megatron.core")

from muon_megatron.models import MOONLIGHT_16B_A3B, count_params, weights  # noqa: E402
from tests.megatron.mcore_harness import run_world  # noqa: E402

from .mcore_workers import meta_parameter_shapes, mini_forward_backward  # noqa: E402

PAPER_TOTAL, PAPER_ACTIVE = 16.0e9, 3.0e9
PAPER_MATRIX_TOTAL, PAPER_MATRIX_ACTIVE = 15.29e9, 2.24e9


@pytest.fixture(scope="module")
def moonlight_shapes():
    (shapes,) = run_world(meta_parameter_shapes, 1, "moonlight-16b-a3b", timeout=600)
    return shapes


def _expert_index_free(name: str) -> str:
    return re.sub(r"local_experts\.\d+\.", "", name)


def test_megatron_moonlight_has_16_0_b_parameters_within_1_percent(moonlight_shapes):
    total = sum(_numel(s) for s in moonlight_shapes.values())
    assert abs(total - PAPER_TOTAL) / PAPER_TOTAL < 0.01, total


def test_megatron_moonlight_matrix_parameters_are_15_29_b_total_and_2_24_b_active(moonlight_shapes):
    spec = MOONLIGHT_16B_A3B
    m = spec.moe
    matrix = {n: s for n, s in moonlight_shapes.items() if len(s) == 2 and "embedding" not in n and "output_layer" not in n}
    total = sum(_numel(s) for s in matrix.values())
    routed = sum(_numel(s) for n, s in matrix.items() if "local_experts" in n or ".experts." in n)
    active = total - routed + routed * m.top_k / m.num_experts
    assert abs(total - PAPER_MATRIX_TOTAL) / PAPER_MATRIX_TOTAL < 0.01, total
    assert abs(active - PAPER_MATRIX_ACTIVE) / PAPER_MATRIX_ACTIVE < 0.01, active
    assert total == count_params(spec).matrix_total


def test_active_parameters_with_embeddings_are_2_91_b_which_the_name_a3b_rounds_up():
    # 2.24 B matrices + 2 x 0.336 B embeddings = 2.915 B: "3 B active" is the name's rounding
    # (2.8 % above); the paper's own 2.24 B figure is matched to 0.2 % above.
    active = count_params(MOONLIGHT_16B_A3B).active
    assert active == 2_914_774_528
    assert abs(active - PAPER_ACTIVE) / PAPER_ACTIVE < 0.03


def test_megatron_parameters_match_the_spec_weights_by_name_and_shape(moonlight_shapes):
    spec_weights = {w.name: w for w in weights(MOONLIGHT_16B_A3B)}
    seen_stacks = {}
    for name, shape in moonlight_shapes.items():
        if "local_experts" in name:
            stack = re.sub(r"\.local_experts\.\d+(\.linear_fc\d)\.weight$", r"\1", name)
            assert stack in spec_weights, name
            assert shape == spec_weights[stack].shape[1:], (name, shape)
            seen_stacks[stack] = seen_stacks.get(stack, 0) + 1
            continue
        assert name in spec_weights, f"megatron has {name} {shape}, the spec does not"
        assert shape == spec_weights[name].shape, name
    for stack, count in seen_stacks.items():
        assert count == spec_weights[stack].shape[0]
    missing = set(spec_weights) - set(moonlight_shapes) - set(seen_stacks)
    # megatron-core >= 0.19 cannot build MLA's kv latent norm with the local layer spec (see
    # megatron_config.build_gpt_model); nothing else may be missing.
    assert all(name.endswith("kv_layernorm.weight") for name in missing), sorted(missing)[:5]


def test_moonlight_mini_trains_one_step_through_megatron_on_the_cpu():
    ((loss, grads_ok),) = run_world(mini_forward_backward, 1, timeout=300)
    assert 4.0 < loss < 7.0  # about ln(256) = 5.5 at initialisation
    assert grads_ok


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
