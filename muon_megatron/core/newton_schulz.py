"""Newton-Schulz orthogonalisation: the one signature every backend sits behind.

``newton_schulz(G)`` approximates the orthogonal polar factor ``U V^T`` of ``G = U S V^T`` with a
fixed number of quintic iterations ``X <- a X + (b M + c M M) X`` where ``M = X X^T``
(Moonlight, arXiv 2502.16982, eq. 4 and its ``toy_train.py``).

Coefficient sets are defined once, here, in :data:`NS_COEFFICIENTS`. To add a set, add an entry
mapping a name to a tuple of ``(a, b, c)`` triples: a set shorter than the requested number of
steps repeats its last triple (which is how per-step schedules such as Polar Express end).
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

Coefficients = tuple[tuple[float, float, float], ...]
CoefficientSpec = Union[str, Sequence[Sequence[float]]]

# Moonlight / Keller Jordan's quintic: the same triple at every step. It does not converge to
# singular value 1 but oscillates in a band around it (see ``MOONLIGHT_SINGULAR_VALUE_BAND``).
_MOONLIGHT = ((3.4445, -4.7750, 2.0315),)

# Polar Express, degree 5 (Amsel, Persson, Musco, Gower, arXiv 2505.16932, Algorithm 1): one
# optimal polynomial per step; every step but the last is deflated by a safety factor of 1.01
# (a / 1.01, b / 1.01^3, c / 1.01^5) for bf16 stability, as the paper's Algorithm 1 does.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]) + (
    _POLAR_EXPRESS_RAW[-1],
)

NS_COEFFICIENTS: dict[str, Coefficients] = {
    "moonlight": _MOONLIGHT,
    "polar_express": _POLAR_EXPRESS,
}

# Singular values of ``newton_schulz(G, steps=5, coefficients="moonlight")`` lie in this band,
# in exact arithmetic, for every singular value s of G with s / ||G||_F >= 2e-3
# (``MOONLIGHT_BAND_MIN_RELATIVE_SV``): each s maps to f^5(s / ||G||_F) with
# f(x) = a x + b x^3 + c x^5, whose range over [2e-3, 1] is [0.6818, 1.2024] (the maximum is
# reached for s / ||G||_F near 4e-3; from 1e-2 upward the range is [0.6818, 1.1344]). Smaller
# singular values are not lifted into the band in 5 steps (f^5 ~ 3.4445^5 x near 0). The quintic
# trades exact convergence for speed (Jordan 2024; Moonlight section 2); a bf16 ``dtype`` adds
# rounding of a few hundredths on top.
MOONLIGHT_SINGULAR_VALUE_BAND = (0.68, 1.21)
MOONLIGHT_BAND_MIN_RELATIVE_SV = 2e-3

NS_EPS = 1e-7


def ns_flops(m: int, n: int, steps: int = 5) -> float:
    """Dense FLOPs of ``steps`` Newton-Schulz iterations on an ``m x n`` matrix:
    per step ``4 s^2 l + 2 s^3`` with ``s = min(m, n)``, ``l = max(m, n)`` (X X^T, M M, B X)."""
    s, l = min(m, n), max(m, n)
    return steps * (4.0 * s * s * l + 2.0 * s**3)


def resolve_coefficients(coefficients: CoefficientSpec, steps: int) -> Coefficients:
    """The ``(a, b, c)`` triple for each of ``steps`` iterations.

    ``coefficients`` is a name in :data:`NS_COEFFICIENTS` or an explicit sequence of triples.
    Raises ValueError for an unknown name, a malformed triple or ``steps < 1``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ns_steps must be a positive integer, got {steps!r}")
    if isinstance(coefficients, str):
        try:
            table = NS_COEFFICIENTS[coefficients]
        except KeyError:
            raise ValueError(
                f"unknown ns_coefficients {coefficients!r}; valid names: {sorted(NS_COEFFICIENTS)}, "
                "or pass an explicit list of (a, b, c) triples, one per step"
            ) from None
    else:
        table = tuple(tuple(float(v) for v in abc) for abc in coefficients)
        if not table or any(len(abc) != 3 for abc in table):
            raise ValueError(
                "ns_coefficients given as a list must hold (a, b, c) triples, one per step; "
                f"got {coefficients!r}"
            )
    return tuple(table[min(i, len(table) - 1)] for i in range(steps))


def _quintic_iteration(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """The reference form of one iteration: ``M = X X^T; X = a X + (b M + c M M) X``."""
    M = X @ X.mT
    B = b * M + c * (M @ M)
    return a * X + B @ X


def iterate_newton_schulz(
    G: torch.Tensor,
    steps: int,
    coefficients: CoefficientSpec,
    dtype: torch.dtype,
    eps: float,
    iteration: Callable[[torch.Tensor, float, float, float], torch.Tensor],
    *,
    batched: bool = False,
) -> torch.Tensor:
    """The frame every Newton-Schulz backend shares: cast ``G`` to ``dtype``, orient it wide
    (transpose tall matrices so the Gram matrix is the small side), divide each matrix by its
    Frobenius norm (+``eps``), apply ``iteration(X, a, b, c)`` once per step of
    :func:`resolve_coefficients`, undo the orientation; a new contiguous tensor of ``G``'s shape.

    ``batched``: hand ``iteration`` a contiguous, row-major ``(batch, m, n)`` tensor (for ``bmm``
    and kernel backends); otherwise ``X`` keeps ``G``'s batch dims and may be a transposed view."""
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    abc = resolve_coefficients(coefficients, steps)
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    norm = X.norm(dim=(-2, -1), keepdim=True) + eps
    batch_shape = X.shape[:-2]
    if batched:  # one pass that normalises and lays the wide matrices out row-major
        out = torch.empty(X.shape, dtype=dtype, device=X.device)
        X = torch.div(X, norm, out=out).reshape(-1, X.size(-2), X.size(-1))
    else:
        X = X / norm
    for a, b, c in abc:
        X = iteration(X, a, b, c)
    X = X.reshape(*batch_shape, X.size(-2), X.size(-1))
    if tall:
        X = X.mT
    return X.contiguous()


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: CoefficientSpec = "moonlight",
    dtype: torch.dtype = torch.bfloat16,
    eps: float = NS_EPS,
) -> torch.Tensor:
    """Orthogonalise ``G`` (shape ``(m, n)`` or a batch ``(..., m, n)``).

    Each matrix of the batch is cast to ``dtype``, divided by its own Frobenius norm (+``eps``)
    and iterated ``steps`` times; tall matrices (m > n) are transposed so the Gram matrix is the
    small side. Returns a new tensor of ``G``'s shape in ``dtype``; ``G`` is not modified.
    Promise: equal, within ``dtype`` rounding, to Moonlight's reference ``zeropower_via_newtonschulz5``
    applied to each matrix on its own.
    """
    return iterate_newton_schulz(G, steps, coefficients, dtype, eps, _quintic_iteration)
