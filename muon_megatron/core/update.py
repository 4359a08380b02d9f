"""The Moonlight Muon update, as pure tensor functions (paper eq. 4).

    buf <- mu * buf + G                  (momentum, sum form)
    G'  <- G + mu * buf                  (Nesterov; without it G' = buf)
    O   <- NS5(G')
    W   <- W * (1 - lr * wd) - lr * scale(A, B) * O

Each function here takes plain tensors; those ending in ``_`` say which argument they mutate.
The element-wise parts (momentum, apply) act on any piece of a matrix, so the distributed
runtime calls the same functions on local shards; only ``newton_schulz`` needs whole matrices.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .newton_schulz import CoefficientSpec, newton_schulz

# Update scales by name; A = rows (fan-out), B = columns (fan-in) of the logical matrix.
UPDATE_SCALES: dict[str, Callable[[int, int], float]] = {
    # Moonlight: RMS of the update ~0.2, like AdamW's, so AdamW lr and wd carry over.
    "moonlight": lambda A, B: 0.2 * math.sqrt(max(A, B)),
    # Keller Jordan's original Muon.
    "keller": lambda A, B: math.sqrt(max(1.0, A / B)),
    # Spectral-norm scaling (Bernstein): sqrt(fan_out / fan_in).
    "spectral": lambda A, B: math.sqrt(A / B),
    "none": lambda A, B: 1.0,
}


def check_update_scale(name: str) -> str:
    """Return ``name`` if it names an update scale; else ValueError listing the valid names."""
    if name not in UPDATE_SCALES:
        raise ValueError(f"unknown update_scale {name!r}; valid names: {sorted(UPDATE_SCALES)}")
    return name


def update_scale(name: str, rows: int, cols: int) -> float:
    """The factor multiplying ``lr * O`` for a logical matrix of shape ``(rows, cols)``."""
    return UPDATE_SCALES[check_update_scale(name)](rows, cols)


def momentum_(buf: torch.Tensor, grad: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Advance ``buf`` in place (``buf = mu * buf + grad``) and return the Newton-Schulz input.

    The input is a new tensor with Nesterov (``grad + mu * buf``) and ``buf`` itself without;
    ``grad`` is never modified. Shapes must match; works on any piece of a matrix.
    """
    buf.mul_(momentum).add_(grad)
    return grad.add(buf, alpha=momentum) if nesterov else buf


def scaled_update(orthogonal: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * O`` in float32 (a new tensor): the step direction before ``lr``."""
    return orthogonal.float().mul_(scale)


def apply_update_(param: torch.Tensor, update: torch.Tensor, *, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay then the step, in place on ``param``:
    ``param = param * (1 - lr * wd) - lr * update`` with ``update = scale * O`` from
    :func:`scaled_update`. Element-wise, so it applies to any piece of a matrix."""
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr)


def orthogonalize_batched(
    matrices: Sequence[torch.Tensor],
    *,
    steps: int = 5,
    coefficients: CoefficientSpec = "moonlight",
    dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    """Newton-Schulz on every matrix of ``matrices``, one batched call per distinct shape.

    Returns the results in input order (each in ``dtype``). Equal to calling
    :func:`newton_schulz` on each matrix alone, within ``dtype`` rounding (batched matmuls may
    accumulate in another order).
    """
    out: list[torch.Tensor | None] = [None] * len(matrices)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, M in enumerate(matrices):
        by_shape.setdefault(tuple(M.shape), []).append(i)
    for idx in by_shape.values():
        if len(idx) == 1:
            out[idx[0]] = newton_schulz(matrices[idx[0]], steps, coefficients, dtype)
            continue
        batch = torch.stack([matrices[i].to(dtype) for i in idx])
        result = newton_schulz(batch, steps, coefficients, dtype)
        for j, i in enumerate(idx):
            out[i] = result[j]
    return out  # type: ignore[return-value]
