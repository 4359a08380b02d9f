"""Independent float64 references for the core tests (tests only, never imported by the package).

Written from ../shared/MOONLIGHT.md (paper eq. 4), not from ``muon_megatron.core``: the logical
matrices of a split are cut out with plain slicing here, not with the package's ``Block`` lists.
"""

from __future__ import annotations

import math

import torch

MOONLIGHT_ABC = (3.4445, -4.7750, 2.0315)


def ns5_float64(G: torch.Tensor, steps: int = 5, abc=MOONLIGHT_ABC, eps: float = 1e-7) -> torch.Tensor:
    """Moonlight's ``zeropower_via_newtonschulz5`` evaluated in float64 on one matrix."""
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + eps)
    table = abc if isinstance(abc[0], (tuple, list)) else (abc,)
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def random_matrix_with_spectrum(m: int, n: int, singular_values: torch.Tensor, generator) -> tuple:
    """``(G, U, V)`` with ``G = U diag(s) V^T`` in float64; ``U`` and ``V`` have orthonormal columns."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator))
    return U @ torch.diag(singular_values.double()) @ V.T, U, V


# --- logical matrices of a parameter, by plain slicing -------------------------------------------


def qkv_parts(W: torch.Tensor, groups: int, q_per_group: int, head_dim: int) -> dict:
    """Megatron's fused QKV rows: per query group [q heads..., k, v]."""
    per = W.reshape(groups, q_per_group + 2, head_dim, W.shape[-1])
    return {
        "q": per[:, :q_per_group].reshape(groups * q_per_group * head_dim, -1),
        "k": per[:, q_per_group].reshape(groups * head_dim, -1),
        "v": per[:, q_per_group + 1].reshape(groups * head_dim, -1),
    }


def qkv_join(parts: dict, groups: int, q_per_group: int, head_dim: int) -> torch.Tensor:
    C = parts["q"].shape[-1]
    q = parts["q"].reshape(groups, q_per_group, head_dim, C)
    k = parts["k"].reshape(groups, 1, head_dim, C)
    v = parts["v"].reshape(groups, 1, head_dim, C)
    return torch.cat([q, k, v], dim=1).reshape(-1, C)


def gate_up_parts(W: torch.Tensor) -> dict:
    half = W.shape[0] // 2
    return {"gate": W[:half], "up": W[half:]}


def gate_up_join(parts: dict) -> torch.Tensor:
    return torch.cat([parts["gate"], parts["up"]], dim=0)


class Split:
    """How a parameter of a given kind breaks into logical matrices, for the reference."""

    def __init__(self, parts, join):
        self.parts, self.join = parts, join


WHOLE = Split(lambda W: {"": W}, lambda parts: parts[""])


def qkv_split(groups, q_per_group, head_dim) -> Split:
    return Split(
        lambda W: qkv_parts(W, groups, q_per_group, head_dim),
        lambda parts: qkv_join(parts, groups, q_per_group, head_dim),
    )


GATE_UP = Split(gate_up_parts, gate_up_join)


def experts_stacked(inner: Split = WHOLE) -> Split:
    """A 3-D ``[E, m, n]`` parameter, each expert split again by ``inner``."""

    def parts(W):
        return {(e, k): v for e in range(W.shape[0]) for k, v in inner.parts(W[e]).items()}

    def join(parts):
        E = 1 + max(e for e, _ in parts)
        return torch.stack([inner.join({k: v for (e2, k), v in parts.items() if e2 == e}) for e in range(E)])

    return Split(parts, join)


def experts_columns(num_experts: int, inner: Split = WHOLE) -> Split:
    """A 2-D ``[m, E * n]`` parameter of experts side by side, each split again by ``inner``."""

    def parts(W):
        chunks = W.chunk(num_experts, dim=1)
        return {(e, k): v for e, c in enumerate(chunks) for k, v in inner.parts(c).items()}

    def join(parts):
        return torch.cat(
            [inner.join({k: v for (e2, k), v in parts.items() if e2 == e}) for e in range(num_experts)], dim=1
        )

    return Split(parts, join)


# --- the Moonlight update -------------------------------------------------------------------------


class MoonlightReference:
    """Moonlight's Muon (MOONLIGHT.md, paper eq. 4) in float64, one parameter, several steps."""

    def __init__(self, W0: torch.Tensor, split: Split, *, lr, momentum=0.95, nesterov=True, weight_decay=0.1,
                 ns_steps=5, abc=MOONLIGHT_ABC):
        self.W = W0.double().clone()
        self.buf = torch.zeros_like(self.W)
        self.split, self.lr, self.mu, self.nesterov = split, lr, momentum, nesterov
        self.wd, self.ns_steps, self.abc = weight_decay, ns_steps, abc

    def step(self, G: torch.Tensor) -> torch.Tensor:
        G = G.double()
        self.buf = self.mu * self.buf + G
        Gn = G + self.mu * self.buf if self.nesterov else self.buf
        updates = {}
        for key, part in self.split.parts(Gn).items():
            A, B = part.shape
            updates[key] = 0.2 * math.sqrt(max(A, B)) * ns5_float64(part, self.ns_steps, self.abc)
        self.W = self.W * (1 - self.lr * self.wd) - self.lr * self.split.join(updates)
        return self.W


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Frobenius-norm relative error of ``x`` against ``ref``, in float64."""
    ref = ref.double()
    return float((x.double() - ref).norm() / ref.norm())
