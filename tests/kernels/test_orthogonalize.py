"""orthogonalize_grouped and the per-shape chooser on the CPU."""

import pytest
import torch

from muon_megatron.core import newton_schulz
from muon_megatron.kernels import BackendChooser, orthogonalize_grouped, plan_buckets


def test_grouped_equals_each_matrix_alone_in_float64():
    shapes = [(8, 40), (16, 40), (40, 16), (16, 40), (24, 24), (8, 40)]
    mats = [torch.randn(s, dtype=torch.float64) for s in shapes]
    plan = plan_buckets(shapes, launch_cost_flops=1e12)
    assert any(b.padded for b in plan.buckets)
    outs = orthogonalize_grouped(mats, dtype=torch.float64, plan=plan)
    for M, O in zip(mats, outs):
        assert O.shape == M.shape
        assert torch.allclose(O, newton_schulz(M, dtype=torch.float64), rtol=0, atol=1e-12)


def test_grouped_bf16_stays_within_bf16_rounding_of_float64():
    mats = [torch.randn(24, 40) for _ in range(4)] + [torch.randn(40, 24)]
    for M, O in zip(mats, orthogonalize_grouped(mats, dtype=torch.bfloat16)):
        ref = newton_schulz(M.double(), dtype=torch.float64)
        assert ((O.double() - ref).norm() / ref.norm()).item() < 5e-2


def test_chooser_picks_torch_batched_on_cpu_and_remembers():
    chooser = BackendChooser()
    assert chooser.choose(4, 16, 32, device="cpu") == "torch_batched"
    assert list(chooser.table.values()) == ["torch_batched"]
    mats = [torch.randn(16, 32) for _ in range(3)]
    outs = orthogonalize_grouped(mats, dtype=torch.float32, backend=chooser)
    assert all(o.dtype == torch.float32 for o in outs)


def test_auto_string_needs_a_chooser():
    with pytest.raises(ValueError, match="BackendChooser"):
        orthogonalize_grouped([torch.randn(4, 8)], backend="auto")


def test_rejects_3d_inputs_and_mismatched_plans():
    with pytest.raises(ValueError, match="2-D"):
        orthogonalize_grouped([torch.randn(2, 4, 8)])
    with pytest.raises(ValueError, match="plan covers"):
        orthogonalize_grouped([torch.randn(4, 8)], plan=plan_buckets([(4, 8), (4, 8)]))
