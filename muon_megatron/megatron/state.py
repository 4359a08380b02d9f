"""The Muon optimizer state in Megatron's checkpoints, as pure functions of the inner optimizer.

Optimizer state is heterogeneous: Muon tensors hold ``momentum_buffer`` only (half of AdamW's
state), AdamW tensors ``step`` / ``exp_avg`` / ``exp_avg_sq``. These functions act on the inner
:class:`.inner.MegatronMuon` (a ``DistributedMuon``) and plain dicts, never on megatron-core's
wrapper objects, so they are tested without a ``DistributedOptimizer``; :mod:`.checkpoint` calls
them from the wrappers. No megatron-core import here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.adamw import init_adamw_state
from ..core.base import checkpoint_group, restore_group

#: Group keys that describe structure, not hyper-parameters: a load never takes them from a
#: checkpoint (``layouts`` and ``names`` are not even saved).
STRUCTURAL_KEYS = ("layouts", "names", "use_muon", "split", "optimizer", "is_expert_parallel")
MUON_STATE_KEYS = ("momentum_buffer",)
ADAMW_STATE_KEYS = ("exp_avg", "exp_avg_sq")
#: The key of the inner optimizer's step count in a distributed-optimizer checkpoint.
STEPS_KEY = "muon_megatron_steps"


class OptimizerStateMismatch(ValueError):
    """The checkpoint's optimizer state is not Muon's (e.g. an AdamW run's)."""


def state_mismatch_error(what: str) -> OptimizerStateMismatch:
    """The error for a checkpoint whose optimizer state is not this package's Muon state
    (``what`` says what was found), naming the flags that load the weights alone."""
    return OptimizerStateMismatch(
        f"the checkpoint's optimizer state is not muon-megatron's Muon state ({what}). To start Muon from "
        "another optimizer's checkpoint (or the reverse), load the weights only: pass --no-load-optim "
        "(and --no-load-rng if the run layout changed), or finetune with --finetune"
    )


def check_muon_groups(saved: Sequence[dict], current: Sequence[dict]) -> None:
    """:class:`OptimizerStateMismatch` unless ``saved`` are Muon param groups of the same kinds
    (``use_muon``) in the same order as ``current``."""
    if len(saved) != len(current) or any(
        "use_muon" not in s or bool(s["use_muon"]) != bool(c["use_muon"]) for s, c in zip(saved, current)
    ):
        raise state_mismatch_error(f"{len(saved)} param groups without muon-megatron's use_muon markers, in this order")


def check_muon_state(state: dict) -> None:
    """:class:`OptimizerStateMismatch` unless every per-tensor entry holds Muon or AdamW keys."""
    for entry in state.values():
        keys = set(entry)
        if not (keys & set(MUON_STATE_KEYS) or keys & set(ADAMW_STATE_KEYS)):
            raise state_mismatch_error(f"state keys {sorted(keys)}")


def group_settings(groups: Sequence[dict]) -> list[dict]:
    """The param groups' entries a checkpoint keeps (no tensors, no layouts, no names)."""
    return [checkpoint_group(g, drop=("layouts", "names")) for g in groups]


def load_group_settings(groups: Sequence[dict], saved: Sequence[dict]) -> None:
    """Take the saved hyper-parameters into ``groups`` in place, keeping their structural keys."""
    check_muon_groups(saved, groups)
    for group, old in zip(groups, saved):
        for key, value in restore_group(old).items():
            if key not in STRUCTURAL_KEYS and key != "params":
                group[key] = value


def init_muon_state(opt: torch.optim.Optimizer, config=None) -> None:
    """Megatron's ``init_state_fn``: zero state for every tensor that has none (momentum for
    Muon groups, AdamW's for the others; used when loading checkpoints into a fresh optimizer)."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            if group["use_muon"]:
                state["momentum_buffer"] = torch.zeros_like(p)
            else:
                state.update(init_adamw_state(p))


def state_keys(use_muon: bool) -> tuple[str, ...]:
    """What a model-space checkpoint stores per parameter: the fp32 main weight and its state."""
    return ("fp32_param",) + (MUON_STATE_KEYS if use_muon else ADAMW_STATE_KEYS)


def state_tensor(main: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    """The tensor stored under ``key`` (:func:`state_keys`) for one main-parameter tensor."""
    return main if key == "fp32_param" else state[key]


def set_adamw_steps(opt: torch.optim.Optimizer, steps: int) -> None:
    """AdamW's step count (which sets its bias correction) for every AdamW tensor of ``opt``."""
    for group in opt.param_groups:
        if not group["use_muon"]:
            for p in group["params"]:
                opt.state[p]["step"] = torch.tensor(float(steps))


def pack_rank_state(opt) -> dict:
    """This rank's whole optimizer state as plain CPU data for ``--ckpt-format torch``: Muon
    momentum as layout pieces (``DistributedMuon.momentum_pieces``, reshardable), AdamW state per
    tensor, and the fp32 main-parameter tensors (Megatron copies them to the model after a load).
    Copies, never views of the live tensors."""
    copy = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
    return {
        "momentum": [dict(piece, values=None if piece["values"] is None else copy(piece["values"]))
                     for piece in opt.momentum_pieces()],
        "adamw": [{k: copy(v) for k, v in opt.state[p].items()}
                  for g in opt.param_groups if not g["use_muon"] for p in g["params"]],
        "params": [copy(p) for g in opt.param_groups for p in g["params"]],
    }


def unpack_rank_state(opt, ranks: Sequence[dict], rank: int) -> None:
    """Inverse of :func:`pack_rank_state` with the packs of every data-parallel rank (``ranks``):
    momentum from all of them (any layout of the same matrices), parameters and AdamW state from
    this ``rank``'s pack."""
    init_muon_state(opt)
    opt.load_momentum_pieces([piece for pack in ranks for piece in pack["momentum"]])
    mine = ranks[rank]
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(params) != len(mine["params"]):
        raise state_mismatch_error(f"{len(mine['params'])} saved tensors for {len(params)} on this rank")
    with torch.no_grad():
        for p, value in zip(params, mine["params"]):
            p.copy_(value)
    adamw = [p for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    for p, state in zip(adamw, mine["adamw"]):
        opt.state[p] = {k: v.to(p.device, copy=True) if k != "step" else v.clone() for k, v in state.items()}
