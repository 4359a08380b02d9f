"""FusedMuon against Muon on the CPU (foreach element-wise path, torch Newton-Schulz)."""

from __future__ import annotations

import copy

import torch

import muon_megatron as mm
from muon_megatron.kernels.fused_muon import FusedMuon


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(12, 20, generator=g), torch.randn(30, 8, generator=g), torch.randn(3, 6, 9, generator=g)]


def _run(opt_cls, params, grads, **kw):
    opt = opt_cls([{"params": params[:2]}, {"params": params[2:], "split": mm.ExpertStack(3)}], lr=0.03,
                  ns_dtype=torch.float32, **kw)
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()
    return opt


def test_fused_step_equals_muon_within_float32_rounding():
    grads = [[torch.randn_like(p) for p in _params(0)] for _ in range(4)]
    a, b = _params(1), _params(1)
    _run(mm.Muon, a, grads)
    _run(FusedMuon, b, grads, backend="torch_reference", elementwise="foreach")
    for x, y in zip(a, b):
        # float32 NS in both; only the order of batched matmuls differs
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


def test_fused_momentum_checkpoint_loads_into_muon_and_continues_identically():
    grads = [[torch.randn_like(p) for p in _params(0)] for _ in range(4)]
    a, b = _params(2), _params(2)
    fused = _run(FusedMuon, a, grads[:2], backend="torch_reference", elementwise="foreach")
    plain = _run(mm.Muon, b, grads[:2])
    plain.load_state_dict(copy.deepcopy(fused.state_dict()))  # as from a file: no shared tensors
    for x, y in zip(a, b):
        y.data.copy_(x)
    for g in grads[2:]:
        for p, q, gp in zip(a, b, g):
            p.grad, q.grad = gp.clone(), gp.clone()
        fused.step()
        plain.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_fused_optimizer_uses_the_runtime_for_plain_matrices_only():
    params = _params(3) + [torch.randn(24, 10)]
    opt = FusedMuon([{"params": params[:3]}, {"params": params[3:], "split": mm.FusedQKV(2, 2, 3)}], lr=0.01,
                    backend="torch_reference", elementwise="foreach")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt._runtimes[0] is not None and opt._runtimes[1] is None
