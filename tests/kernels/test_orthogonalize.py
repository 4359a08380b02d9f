"""orthogonalize_grouped and the per-shape chooser on the CPU."""

import pytest
import torch

from muon_megatron.core import newton_schulz, orthogonalize_batched
from muon_megatron.kernels import (
    AutoOrthogonalizer,
    BackendChooser,
    check_backend_name,
    orthogonalize_grouped,
    orthogonalizer,
    ns_buckets,
)
from muon_megatron.kernels.select import MIN_TIMED_FLOPS, bucket_flops


def test_grouped_equals_each_matrix_alone_in_float64():
    shapes = [(8, 40), (16, 40), (40, 16), (16, 40), (24, 24), (8, 40)]
    mats = [torch.randn(s, dtype=torch.float64) for s in shapes]
    plan = ns_buckets(shapes, launch_cost_flops=1e12)
    assert any(b.padded for b in plan.buckets)
    outs = orthogonalize_grouped(mats, dtype=torch.float64, buckets=plan)
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
    with pytest.raises(ValueError, match="buckets cover"):
        orthogonalize_grouped([torch.randn(4, 8)], buckets=ns_buckets([(4, 8), (4, 8)]))


def test_bucket_flops_is_the_dense_newton_schulz_count():
    # 5 steps of X X^T (2 m^2 n), c A A + b A (2 m^3) and B X (2 m^2 n), m the short side
    for rows, cols in ((1408, 2048), (2048, 1408), (64, 64)):
        m, n = min(rows, cols), max(rows, cols)
        assert bucket_flops(3, rows, cols, 5) == 3 * 5 * (2 * m * m * n + 2 * m ** 3 + 2 * m * m * n)


def test_chooser_does_not_time_launch_bound_buckets_on_cuda(monkeypatch):
    import muon_megatron.kernels.select as select

    monkeypatch.setattr(select, "available_backends", lambda device, dtype: ["torch_batched", "triton_symmetric"])
    timed = []
    monkeypatch.setattr(select, "time_call", lambda fn, **kw: timed.append(fn) or 1.0)
    chooser = BackendChooser()
    # 4 x (576 x 2048): 0.2 TFLOP per call, below MIN_TIMED_FLOPS: no tensor made, nothing timed
    assert bucket_flops(4, 576, 2048, 5) < MIN_TIMED_FLOPS
    assert chooser.choose(4, 576, 2048, device="cuda") == "torch_batched"
    assert timed == [] and chooser.timings == {}
    # a lower threshold would time it (and allocate on the GPU, which this machine may lack)
    assert BackendChooser(min_timed_flops=0).min_timed_flops == 0


def test_torch_backend_name_selects_the_cores_batched_path():
    assert orthogonalizer("torch") is None


def test_auto_backend_off_cuda_is_the_cores_batched_path_bit_for_bit():
    auto = orthogonalizer("auto")
    assert isinstance(auto, AutoOrthogonalizer)
    mats = [torch.randn(24, 40) for _ in range(3)]
    for got, want in zip(auto(mats, dtype=torch.float32), orthogonalize_batched(mats, dtype=torch.float32)):
        assert torch.equal(got, want)


def test_a_registry_backend_name_runs_that_backend_for_every_bucket():
    mats = [torch.randn(24, 40) for _ in range(3)]
    fixed = orthogonalizer("torch_reference")
    for M, got in zip(mats, fixed(mats, steps=5, coefficients="moonlight", dtype=torch.float64)):
        assert torch.allclose(got, newton_schulz(M.double(), dtype=torch.float64), rtol=0, atol=1e-12)


def test_unknown_backend_names_are_refused_naming_the_option():
    with pytest.raises(ValueError, match="ns_backend 'cublas'.*triton_symmetric"):
        orthogonalizer("cublas")
    with pytest.raises(ValueError, match="--muon-ns-backend 'x'"):
        check_backend_name("x", "--muon-ns-backend")
