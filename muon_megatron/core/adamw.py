"""AdamW for the parameters Muon does not update (embeddings, head, norm gains, biases).

Moonlight gives them AdamW with Muon's lr and weight decay (arXiv 2502.16982, section 2.2). The
step is written in the operation order of ``torch.optim.AdamW``'s single-tensor path, so it is
bitwise equal to it on the CPU; every optimizer of the package uses this one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def init_adamw_state(param: torch.Tensor) -> dict:
    """Zero AdamW state for ``param``: ``step``, ``exp_avg``, ``exp_avg_sq``."""
    return {
        "step": torch.tensor(0.0),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def adamw_step_(
    param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas: Sequence[float], eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One AdamW step on ``param`` in place (``state`` is created on first use and advanced).

    Returns ``(exp_avg, denom, step_size)``: the applied update, weight decay excluded, is
    ``step_size * exp_avg / denom`` (for RMS reporting; nothing is computed for it here)."""
    if not state:
        state.update(init_adamw_state(param))
    beta1, beta2 = betas
    state["step"] += 1
    step = state["step"].item()
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    return exp_avg, denom, step_size


def adamw_group_step_(group: dict, state: dict, *, report_rms: bool) -> tuple[float, int]:
    """AdamW on every parameter of ``group`` that has a gradient (``state``: the optimizer's
    per-parameter state). Returns the sum of squares of the applied updates (weight decay
    excluded) and their element count, for RMS reporting (0, 0 unless ``report_rms``)."""
    sq, count = 0.0, 0
    for p in group["params"]:
        if p.grad is None:
            continue
        exp_avg, denom, step_size = adamw_step_(
            p, p.grad, state[p], lr=group["lr"], betas=group["adamw_betas"], eps=group["adamw_eps"],
            weight_decay=group["weight_decay"],
        )
        if report_rms:
            sq += float((exp_avg / denom).square().sum()) * step_size**2
            count += p.numel()
    return sq, count
