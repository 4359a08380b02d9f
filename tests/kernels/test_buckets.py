"""Newton-Schulz buckets: coverage, orientation, chunking, and exactness of zero padding."""

import pytest
import torch

from muon_megatron.core import newton_schulz
from muon_megatron.kernels import ns_flops, ns_buckets

MOONLIGHT_LAYER = [(3072, 2048), (576, 2048), (4096, 512), (2048, 2048), (64, 2048)] + [(1408, 2048)] * 128 + [
    (2048, 1408)] * 64 + [(2816, 2048)] * 2 + [(2048, 2816)]


def covered(plan):
    return sorted(i for b in plan.buckets for i in b.indices)


def test_every_matrix_is_planned_exactly_once():
    plan = ns_buckets(MOONLIGHT_LAYER * 2)
    assert covered(plan) == list(range(2 * len(MOONLIGHT_LAYER)))


def test_buckets_never_mix_orientations():
    plan = ns_buckets(MOONLIGHT_LAYER, launch_cost_flops=1e15)
    for b in plan.buckets:
        tall = {s[0] > s[1] for s in b.shapes}
        assert tall == {b.shape[0] > b.shape[1]}
        assert all(s[0] <= b.shape[0] and s[1] <= b.shape[1] for s in b.shapes)


def test_without_launch_cost_no_group_is_padded():
    plan = ns_buckets(MOONLIGHT_LAYER, launch_cost_flops=0.0)
    assert not any(b.padded for b in plan.buckets)


def test_small_groups_merge_when_launch_cost_dominates():
    plan = ns_buckets([(8, 64), (16, 64), (16, 64)], launch_cost_flops=1e12)
    assert len(plan.buckets) == 1 and plan.buckets[0].shape == (16, 64) and plan.buckets[0].padded


def test_large_groups_are_chunked_to_max_batch_in_input_order():
    plan = ns_buckets([(14, 20)] * 300, max_batch=128)
    assert [b.batch for b in plan.buckets] == [100, 100, 100]
    assert [i for b in plan.buckets for i in b.indices] == list(range(300))


def test_useful_flops_count_the_unpadded_shapes():
    plan = ns_buckets([(8, 64), (16, 64)], launch_cost_flops=1e12)
    b = plan.buckets[0]
    assert b.useful_flops() == ns_flops(8, 64) + ns_flops(16, 64) < b.flops()
    assert ns_flops(1408, 2048) == 5 * (4 * 1408**2 * 2048 + 2 * 1408**3)


@pytest.mark.parametrize("shape,padded", [((8, 40), (16, 56)), ((40, 8), (56, 16)), ((12, 12), (20, 20))])
def test_zero_padding_leaves_newton_schulz_unchanged(shape, padded):
    G = torch.randn(shape, dtype=torch.float64)
    P = torch.zeros(padded, dtype=torch.float64)
    P[: shape[0], : shape[1]] = G
    out = newton_schulz(P, dtype=torch.float64)
    ref = newton_schulz(G, dtype=torch.float64)
    assert torch.allclose(out[: shape[0], : shape[1]], ref, rtol=0, atol=1e-12)
    assert out[shape[0]:].abs().max().item() == 0 if padded[0] > shape[0] else True
    assert out[:, shape[1]:].abs().max().item() == 0 if padded[1] > shape[1] else True


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_batch"):
        ns_buckets([(2, 2)], max_batch=0)
    with pytest.raises(ValueError, match="empty"):
        ns_buckets([(0, 2)])
