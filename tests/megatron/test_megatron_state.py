"""The Megatron checkpoint's pure state functions (``muon_megatron.megatron.state``), on inner
optimizers built in one process: no megatron-core wrapper, no process group."""

from __future__ import annotations

import pytest
import torch

from muon_megatron.distributed import ParamLayout
from muon_megatron.megatron.inner import MegatronMuon
from muon_megatron.megatron.state import (
    OptimizerStateMismatch,
    check_muon_groups,
    group_settings,
    init_muon_state,
    load_group_settings,
    pack_rank_state,
    unpack_rank_state,
)

SHAPE = (6, 8)


def _optimizer(pieces, seed=0, lr=0.01):
    """One Muon tensor per (row range) piece of the (6, 8) matrix 'w' (a ZeRO-style flat range of
    it), and one AdamW vector; weights from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(SHAPE, generator=g)
    tensors = [torch.nn.Parameter(full.reshape(-1)[a:b].clone()) for a, b in pieces]
    bias = torch.nn.Parameter(torch.randn(8, generator=g))
    groups = [
        {"params": tensors, "use_muon": True, "names": ["w"] * len(tensors),
         "layouts": [[(ParamLayout("w", SHAPE, flat_range=(a, b)), 0)] for a, b in pieces]},
        {"params": [bias], "use_muon": False, "names": ["b"]},
    ]
    return MegatronMuon(groups, lr=lr, ns_dtype=torch.float32), tensors, bias


def _step(opt, tensors, bias, seed):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(SHAPE, generator=g)
    for t in tensors:
        t.grad = None
    lay = opt.param_groups[0]["layouts"]
    for t, [(layout, _)] in zip(tensors, lay):
        a, b = layout.kept_range
        t.grad = full.reshape(-1)[a:b].clone()
    bias.grad = torch.randn(8, generator=g)
    opt.step()


def test_packed_state_restores_params_momentum_and_adamw_into_a_fresh_optimizer():
    opt, tensors, bias = _optimizer([(0, 48)])
    for seed in range(3):
        _step(opt, tensors, bias, seed)
    pack = pack_rank_state(opt)
    fresh, f_tensors, f_bias = _optimizer([(0, 48)], seed=7)
    unpack_rank_state(fresh, [pack], 0)
    assert torch.equal(f_tensors[0], tensors[0]) and torch.equal(f_bias, bias)
    assert torch.equal(fresh.state[f_tensors[0]]["momentum_buffer"], opt.state[tensors[0]]["momentum_buffer"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state[f_bias][key], opt.state[bias][key])
    # and the next step is the same
    _step(opt, tensors, bias, 9)
    _step(fresh, f_tensors, f_bias, 9)
    assert torch.equal(f_tensors[0], tensors[0]) and torch.equal(f_bias, bias)


def test_momentum_packed_in_two_pieces_reshards_into_one_whole_tensor():
    """The momentum of a layout cut in two (as two DP ranks hold it) restores a one-piece layout."""
    cut, tensors, bias = _optimizer([(0, 20), (20, 48)])
    for seed in range(2):
        _step(cut, tensors, bias, seed)
    whole, tw, _ = _optimizer([(0, 48)])
    whole.load_momentum_pieces(pack_rank_state(cut)["momentum"])
    expected = torch.cat([cut.state[t]["momentum_buffer"] for t in tensors])
    assert expected.abs().sum() > 0
    assert torch.equal(whole.state[tw[0]]["momentum_buffer"], expected)


def test_group_settings_carry_hyperparameters_not_structure_and_load_back():
    opt, _, _ = _optimizer([(0, 48)], lr=0.03)
    saved = group_settings(opt.param_groups)
    assert all("layouts" not in g and "names" not in g and "params" not in g for g in saved)
    assert saved[0]["ns_dtype"] == "float32"  # by name: loads with weights_only=True
    other, _, _ = _optimizer([(0, 48)], lr=0.5)
    layouts = other.param_groups[0]["layouts"]
    load_group_settings(other.param_groups, saved)
    assert other.param_groups[0]["lr"] == 0.03 and other.param_groups[0]["ns_dtype"] is torch.float32
    assert other.param_groups[0]["layouts"] is layouts


def test_groups_of_another_optimizer_are_refused_naming_the_flag():
    opt, _, _ = _optimizer([(0, 48)])
    with pytest.raises(OptimizerStateMismatch, match="--no-load-optim"):
        check_muon_groups([{"lr": 0.1}, {"lr": 0.1}], opt.param_groups)
    swapped = list(reversed(group_settings(opt.param_groups)))
    with pytest.raises(OptimizerStateMismatch, match="--no-load-optim"):
        load_group_settings(opt.param_groups, swapped)


def test_init_state_gives_zero_momentum_and_zero_adamw_state():
    opt, tensors, bias = _optimizer([(0, 48)])
    init_muon_state(opt)
    assert set(opt.state[tensors[0]]) == {"momentum_buffer"} and not opt.state[tensors[0]]["momentum_buffer"].any()
    assert set(opt.state[bias]) == {"step", "exp_avg", "exp_avg_sq"} and float(opt.state[bias]["step"]) == 0.0
