"""Every Newton-Schulz backend available here against the float64 core reference."""

import pytest
import torch

from muon_megatron.core import newton_schulz
from muon_megatron.kernels import NS_BACKENDS, available_backends, get_backend, newton_schulz_fused

# float32 GEMMs over five iterations: far under 1e-4 relative. bf16: the quintic amplifies each
# rounding; the core's own bf16 reference form lands 2e-2 to 4e-2 from float64 on these small
# CPU matrices (fewer entries to average), so 5e-2 bounds "within bf16 rounding" here.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}

SHAPES = [(16, 48), (48, 16), (32, 32), (3, 20, 36), (2, 2, 36, 20)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_torch_batched_matches_float64_reference(shape, dtype):
    G = torch.randn(shape, dtype=torch.float64)
    ref = newton_schulz(G, dtype=torch.float64)
    out = newton_schulz_fused(G, dtype=dtype)
    assert out.shape == G.shape and out.dtype == dtype and out.is_contiguous()
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("coefficients", ["moonlight", "polar_express", [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]])
def test_torch_batched_honours_coefficient_sets(coefficients):
    G = torch.randn(2, 24, 40, dtype=torch.float64)
    ref = newton_schulz(G, steps=4, coefficients=coefficients, dtype=torch.float64)
    assert rel(newton_schulz_fused(G, steps=4, coefficients=coefficients, dtype=torch.float64), ref) < 1e-12


@pytest.mark.parametrize("name", ["torch_batched", "torch_baddbmm"])
def test_bf16_backend_is_on_average_no_further_from_float64_than_the_core_reference(name):
    torch.manual_seed(0)
    fn = get_backend(name).fn
    ours, core = [], []
    for _ in range(8):
        G = torch.randn(2, 24, 40)
        ref = newton_schulz(G.double(), dtype=torch.float64)
        ours.append(rel(fn(G, 5, "moonlight", torch.bfloat16), ref))
        core.append(rel(newton_schulz(G), ref))
    assert sum(ours) <= 1.05 * sum(core)


def test_torch_batched_does_not_modify_input():
    G = torch.randn(20, 30)
    before = G.clone()
    newton_schulz_fused(G, dtype=torch.float32)
    assert torch.equal(G, before)


def test_torch_batched_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz_fused(torch.randn(5))


@pytest.mark.parametrize("name", available_backends(torch.device("cpu"), torch.float32))
def test_every_cpu_backend_matches_float64(name):
    G = torch.randn(3, 24, 40, dtype=torch.float64)
    out = get_backend(name).fn(G, 5, "moonlight", torch.float32)
    assert rel(out, newton_schulz(G, dtype=torch.float64)) < TOL[torch.float32]


def test_triton_backend_is_not_offered_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton_symmetric" not in available_backends(torch.device("cpu"), torch.bfloat16)


def test_unknown_backend_error_lists_names():
    with pytest.raises(ValueError, match="torch_batched"):
        get_backend("cublas_magic")
    assert set(NS_BACKENDS) >= {"torch_reference", "torch_batched", "triton_symmetric"}
