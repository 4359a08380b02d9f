"""The Moonlight Muon update, as pure tensor functions (paper eq. 4).

    buf <- mu * buf + G                  (momentum, sum form)
    G'  <- G + mu * buf                  (Nesterov; without it G' = buf)
    O   <- NS5(G')
    W   <- W * (1 - lr * wd) - lr * scale(A, B) * O

The update exists here once, in list form, and every path calls it: :func:`momentum_` (the
momentum and the Newton-Schulz input), :func:`newton_schulz` on whole matrices (batched by shape:
:func:`orthogonalize_batched`), then :func:`decay_` and :func:`apply_orthogonal_` (decoupled weight
decay, and the scaled step straight from the Newton-Schulz output). The core ``Muon``, the
distributed engine behind both engine adapters, and the GPU step runtime's torch path use these
functions; its Triton element-wise kernels are a backend of the same two stages, checked against
them by test. Functions ending in ``_`` mutate the tensors they say; the element-wise ones act on
any piece of a matrix, so the distributed runtime calls them on local shards.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

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
    if not isinstance(name, str) or name not in UPDATE_SCALES:
        raise ValueError(f"unknown update_scale {name!r}; valid names: {sorted(UPDATE_SCALES)}")
    return name


def update_scale(name: str, rows: int, cols: int) -> float:
    """The factor multiplying ``lr * O`` for a logical matrix of shape ``(rows, cols)``."""
    return UPDATE_SCALES[check_update_scale(name)](rows, cols)


def group_by_shape(shapes: Iterable[Sequence[int]]) -> dict[tuple, list[int]]:
    """Positions of equal shapes: ``{shape: [indices]}``, shapes in first-appearance order and
    indices ascending. The one grouping rule behind every batched Newton-Schulz call (the core
    optimizer's buckets, the distributed plan's, the GPU step's)."""
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(int(s) for s in shape), []).append(i)
    return groups


def momentum_(
    bufs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, momentum: float, nesterov: bool
) -> list[torch.Tensor]:
    """Advance every momentum buffer in place (``buf = mu * buf + g``) and return the Newton-Schulz
    inputs: new tensors ``g + mu * buf`` with Nesterov, the buffers themselves without.

    Lists of equal-shaped pairs (any pieces of matrices: element-wise); ``grads`` are never
    modified. Multi-tensor calls, so one launch per operation on a GPU, not per tensor.
    """
    bufs, grads = list(bufs), list(grads)
    if not bufs:
        return []
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    return list(torch._foreach_add(grads, bufs, alpha=momentum)) if nesterov else bufs


def decay_(params: Sequence[torch.Tensor], *, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay in place: ``W *= 1 - lr * wd`` on every tensor (nothing when wd is 0).
    It comes first: ``W <- W (1 - lr wd) - lr scale O`` (paper eq. 4)."""
    params = list(params)
    if weight_decay and params:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)


def apply_orthogonal_(targets: Sequence[torch.Tensor], updates: Sequence[torch.Tensor],
                      steps: Sequence[float]) -> None:
    """``targets[i] -= steps[i] * updates[i]`` in place, where ``steps[i] = lr * scale(A, B)`` of
    the matrix the pair belongs to and ``updates[i]`` its region of the Newton-Schulz output (any
    dtype: it is added in the target's). Pairs of equal step go through one multi-tensor call.
    Element-wise, so any region of a matrix can be applied on its own, straight from the output."""
    by_step: dict[float, tuple[list, list]] = {}
    for target, update, step in zip(targets, updates, steps, strict=True):
        pair = by_step.setdefault(float(step), ([], []))
        pair[0].append(target)
        pair[1].append(update)
    for step, (ts, us) in by_step.items():
        torch._foreach_add_(ts, us, alpha=-step)


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
    for idx in group_by_shape(M.shape for M in matrices).values():
        if len(idx) == 1:
            out[idx[0]] = newton_schulz(matrices[idx[0]], steps, coefficients, dtype)
            continue
        batch = torch.stack([matrices[i].to(dtype) for i in idx])
        result = newton_schulz(batch, steps, coefficients, dtype)
        for j, i in enumerate(idx):
            out[i] = result[j]
    return out  # type: ignore[return-value]
