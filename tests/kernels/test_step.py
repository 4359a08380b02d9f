"""MuonStepRuntime (foreach path on the CPU) against the core single-process Muon."""

import pytest
import torch

from muon_megatron.core import Muon
from muon_megatron.kernels import MuonStepRuntime

SHAPES = [(24, 40), (40, 24), (3, 24, 40), (8, 40), (8, 40), (40, 56)]


def run_core(params, grads_per_step, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Muon([{"params": ps}], **kw)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], [opt.state[p]["momentum_buffer"] for p in ps]


@pytest.mark.parametrize("nesterov", [True, False])
def test_runtime_matches_core_muon_in_float64(nesterov):
    torch.manual_seed(0)
    p0 = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    steps = [[torch.randn(s, dtype=torch.float64) for s in SHAPES] for _ in range(3)]
    ref, ref_bufs = run_core(p0, steps, lr=0.02, weight_decay=0.1, nesterov=nesterov, ns_dtype=torch.float64)
    ours = [p.clone() for p in p0]
    rt = MuonStepRuntime(ours, ns_dtype=torch.float64, nesterov=nesterov, backend="torch_batched",
                         launch_cost_flops=1e12)
    assert any(b.padded for b in rt.buckets.buckets)  # the padded path is exercised
    for grads in steps:
        rt.step_(grads, lr=0.02, weight_decay=0.1)
    # Newton-Schulz runs in float64 on both sides; what differs is fp32 storage (the core's
    # scaled update, the runtime's fp32 momentum), so agreement is at float32 rounding.
    for a, r, q in zip(ours, ref, p0):
        assert ((a - r).norm() / (r - q).norm()).item() < 1e-6
    for a, r in zip(rt.buffers, ref_bufs):
        assert torch.allclose(a.double(), r.double(), rtol=1e-6, atol=1e-6)


def test_runtime_bf16_update_within_bf16_rounding_of_float64():
    torch.manual_seed(1)
    p0 = [torch.randn(s) for s in SHAPES]
    grads = [torch.randn(s) for s in SHAPES]
    ref, _ = run_core([p.double() for p in p0], [[g.double() for g in grads]], lr=0.02, weight_decay=0.1,
                      ns_dtype=torch.float64)
    ours = [p.clone() for p in p0]
    MuonStepRuntime(ours, backend="torch_batched").step_(grads, lr=0.02, weight_decay=0.1)
    for a, r, q in zip(ours, ref, p0):
        assert ((a.double() - r).norm() / (r - q.double()).norm()).item() < 5e-2


def test_gradients_are_not_modified_and_state_is_momentum_only():
    p = [torch.randn(16, 32)]
    g = [torch.randn(16, 32)]
    before = g[0].clone()
    rt = MuonStepRuntime(p, ns_dtype=torch.float32, backend="torch_batched")
    rt.step_(g, lr=0.1, weight_decay=0.0)
    assert torch.equal(g[0], before)
    assert rt.state_bytes() == 16 * 32 * 4


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="2-D matrices or 3-D"):
        MuonStepRuntime([torch.randn(4)])
    with pytest.raises(ValueError, match="momentum"):
        MuonStepRuntime([torch.randn(4, 4)], momentum=1.0)
    with pytest.raises(ValueError, match="elementwise"):
        MuonStepRuntime([torch.randn(4, 4)], elementwise="cuda")
    with pytest.raises(ValueError, match="update_scale"):
        MuonStepRuntime([torch.randn(4, 4)], update_scale="huge")
    with pytest.raises(ValueError, match="gradients"):
        MuonStepRuntime([torch.randn(4, 4)], backend="torch_batched").step_([], lr=0.1, weight_decay=0.0)
