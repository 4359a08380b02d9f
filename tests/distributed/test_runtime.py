"""Spawned gloo ranks: bad layouts fail on every rank, non-finite gradients skip everywhere,
checkpoints resume to the same numbers, and momentum reshards to another layout."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import muon_megatron as mm
from muon_megatron.distributed import DistributedMuon, ParamLayout, PlanError

from .harness import run_ranks

SHAPE = (12, 10)


def _zero1(rank, world, numel):
    cuts = [k * numel // world for k in range(world + 1)]
    return cuts[rank], cuts[rank + 1]


def _grads(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(steps)]


def _opt(rank, world, w0, **kw):
    lo, hi = _zero1(rank, world, w0.numel())
    p = w0.reshape(-1)[lo:hi].clone()
    opt = DistributedMuon([{"params": [p], "layouts": [ParamLayout("w", SHAPE, flat_range=(lo, hi))]}], lr=0.05,
                          ns_dtype=torch.float32, **kw)
    return p, opt, (lo, hi)


def mismatched_shapes(rank, world):
    shape = (12, 10) if rank == 0 else (10, 12)
    p = torch.zeros(60)
    try:
        DistributedMuon([{"params": [p], "layouts": [ParamLayout("w", shape, flat_range=(60 * rank, 60 * rank + 60))]}])
    except PlanError as err:
        return str(err)
    return None


def test_inconsistent_shapes_fail_on_every_rank_naming_the_matrix():
    messages = run_ranks(mismatched_shapes, 2, timeout=120)
    assert all(m is not None and "'w'" in m for m in messages)


def nonfinite_on_one_rank(rank, world):
    w0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    p, opt, (lo, hi) = _opt(rank, world, w0)
    g = _grads(2)
    p.grad = g[0].reshape(-1)[lo:hi].clone()
    opt.step()
    before = p.clone(), opt.state[p]["momentum_buffer"].clone()
    p.grad = g[1].reshape(-1)[lo:hi].clone()
    if rank == 1:
        p.grad[0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return (torch.equal(before[0], p), torch.equal(before[1], opt.state[p]["momentum_buffer"]), opt.skipped_steps,
            [str(w.message) for w in caught])


def test_a_nan_on_one_rank_skips_the_step_on_every_rank_and_keeps_state():
    for same_param, same_momentum, skipped, messages in run_ranks(nonfinite_on_one_rank, 2, timeout=120):
        assert same_param and same_momentum and skipped == 1
        assert any("non-finite" in m for m in messages)


def resume(rank, world, path):
    w0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    g = _grads(6, seed=3)
    p, opt, (lo, hi) = _opt(rank, world, w0)
    for k in range(6):
        p.grad = g[k].reshape(-1)[lo:hi].clone()
        opt.step()
        if k == 2:
            torch.save({"p": p.clone(), "opt": opt.state_dict()}, f"{path}.{rank}")
    straight = p.clone()
    saved = torch.load(f"{path}.{rank}", weights_only=False)
    q, opt2, _ = _opt(rank, world, w0)
    q.data.copy_(saved["p"])
    opt2.load_state_dict(saved["opt"])
    for k in range(3, 6):
        q.grad = g[k].reshape(-1)[lo:hi].clone()
        opt2.step()
    return torch.equal(straight, q)


def test_state_dict_resume_gives_the_same_numbers_as_an_uninterrupted_run(tmp_path):
    assert all(run_ranks(resume, 2, str(tmp_path / "ckpt"), timeout=120))


def momentum_reshard(rank, world, path, phase):
    """phase 'save': 2 ranks run 2 steps and save momentum pieces; phase 'load': 3 ranks load them
    and continue; both compared with one process that never stopped."""
    w0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    g = _grads(4, seed=5)
    if phase == "save":
        p, opt, (lo, hi) = _opt(rank, world, w0)
        for k in range(2):
            p.grad = g[k].reshape(-1)[lo:hi].clone()
            opt.step()
        torch.save({"p": (lo, hi, p.clone()), "m": opt.momentum_pieces()}, f"{path}.{rank}")
        return None
    saved = [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]
    full = torch.empty(w0.numel())
    for s in saved:
        lo, hi, t = s["p"]
        full[lo:hi] = t
    p, opt, (lo, hi) = _opt(rank, world, full.view(SHAPE))
    opt.load_momentum_pieces([piece for s in saved for piece in s["m"]])
    for k in range(2, 4):
        p.grad = g[k].reshape(-1)[lo:hi].clone()
        opt.step()
    return lo, hi, p.clone()


def test_momentum_saved_at_dp2_resumes_at_dp3_to_the_same_numbers(tmp_path):
    path = str(tmp_path / "m")
    run_ranks(momentum_reshard, 2, path, "save", timeout=120)
    results = run_ranks(momentum_reshard, 3, path, "load", timeout=120)
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ref = mm.Muon([w], lr=0.05, ns_dtype=torch.float32)
    for g in _grads(4, seed=5):
        w.grad = g
        ref.step()
    for lo, hi, piece in results:
        torch.testing.assert_close(piece, w.reshape(-1)[lo:hi], rtol=1e-5, atol=1e-6)


def test_momentum_pieces_missing_a_rank_are_an_error():
    w = torch.zeros(SHAPE)
    opt = DistributedMuon([{"params": [w], "layouts": [ParamLayout("w", SHAPE)]}])
    piece = {"key": "w", "view": SHAPE, "rect": (0, 0, 6, 10), "values": torch.zeros(6, 10)}
    with pytest.raises(ValueError, match="covers 60 of 120 elements of 'w'"):
        opt.load_momentum_pieces([piece])


def test_muon_group_without_layouts_is_rejected():
    with pytest.raises(ValueError, match="layouts"):
        DistributedMuon([{"params": [torch.zeros(3, 3)]}])


def test_different_ns_settings_between_groups_are_rejected():
    a, b = torch.zeros(3, 3), torch.zeros(3, 3)
    with pytest.raises(ValueError, match="ns_steps"):
        DistributedMuon([{"params": [a], "layouts": [ParamLayout("a", (3, 3))]},
                         {"params": [b], "layouts": [ParamLayout("b", (3, 3))], "ns_steps": 6}])


def test_single_process_without_torch_distributed_matches_muon():
    assert not dist.is_initialized()
    w = torch.randn(9, 5)
    ref = w.clone()
    a = DistributedMuon([{"params": [w], "layouts": [ParamLayout("w", (9, 5))]}], ns_dtype=torch.float32, lr=0.1)
    b = mm.Muon([ref], ns_dtype=torch.float32, lr=0.1)
    for g in torch.randn(3, 9, 5):
        w.grad, ref.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(w, ref)


def test_state_dict_carries_no_layouts_loads_weights_only_and_keeps_current_layouts(tmp_path):
    w = torch.randn(6, 4)
    layout = ParamLayout("w", (6, 4))
    opt = DistributedMuon([{"params": [w], "layouts": [layout]}], ns_dtype=torch.float32)
    w.grad = torch.randn(6, 4)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)  # plain data only
    assert "layouts" not in saved["param_groups"][0]
    other = DistributedMuon([{"params": [w.clone()], "layouts": [layout]}], ns_dtype=torch.float32)
    other.load_state_dict(saved)
    assert other.param_groups[0]["layouts"] == [[(layout, 0)]]
    assert torch.equal(other.state[other.param_groups[0]["params"][0]]["momentum_buffer"],
                       opt.state[w]["momentum_buffer"])

