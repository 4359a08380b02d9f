"""Newton-Schulz in plain torch with the scalar work folded into the matmuls.

Same contract as :func:`muon_megatron.core.newton_schulz` (same signature, same coefficient
table). Each iteration is three matmul launches and one tiny diagonal add:

    M  = X X^T                     bmm
    B' = c M M + b M + a I         baddbmm(M, M, M, beta=b, alpha=c), then diagonal += a
    X  = B' X                      bmm  (= a X + B X)

The reference form spends five extra element-wise kernels per iteration on ``b * M``,
``c * (M M)``, their sum, ``a * X`` and the last sum. Folding ``a X`` into ``B`` turns the last
product into a plain ``bmm``, which cuBLAS runs faster than ``baddbmm`` with a ``beta`` read
(issue 7, run 1 on the H200: the ``B X`` product of 128 expert matrices took 2.3 ms as
``baddbmm``). Rounding ``a + B_ii`` to bf16 costs the same relative error as rounding ``a X``.
Tall inputs are transposed once into a contiguous wide copy, so every product sees row-major
operands. Equal to the core within ``dtype`` rounding, not bitwise.
"""

from __future__ import annotations

import torch

from ..core.newton_schulz import NS_EPS, CoefficientSpec, resolve_coefficients


def prepare(G: torch.Tensor, dtype: torch.dtype, eps: float) -> tuple[torch.Tensor, bool, torch.Size]:
    """Cast, orient (wide), normalise each matrix by its Frobenius norm; as a 3-D batch.

    Returns ``(X, tall, batch_shape)``; ``X`` may be a transposed (non-contiguous) view.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    norm = X.norm(dim=(-2, -1), keepdim=True) + eps
    batch_shape = X.shape[:-2]
    # One pass that normalises and (for tall inputs) lays the wide matrix out row-major.
    out = torch.empty(X.shape, dtype=dtype, device=X.device)
    torch.div(X, norm, out=out)
    return out.reshape(-1, out.size(-2), out.size(-1)), tall, batch_shape


def finish(X: torch.Tensor, tall: bool, batch_shape: torch.Size) -> torch.Tensor:
    """Undo :func:`prepare`'s batching and orientation; a contiguous result like the core's."""
    X = X.reshape(*batch_shape, X.size(-2), X.size(-1))
    if tall:
        X = X.mT
    return X.contiguous()


def newton_schulz_fused(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: CoefficientSpec = "moonlight",
    dtype: torch.dtype = torch.bfloat16,
    eps: float = NS_EPS,
) -> torch.Tensor:
    """:func:`muon_megatron.core.newton_schulz` with three matmul launches per iteration (plus the
    diagonal add).

    Works on any device and dtype torch's ``baddbmm`` supports; ``G`` is not modified.
    """
    abc = resolve_coefficients(coefficients, steps)
    X, tall, batch_shape = prepare(G, dtype, eps)
    for a, b, c in abc:
        M = torch.bmm(X, X.mT)
        B = torch.baddbmm(M, M, M, beta=b, alpha=c)
        B.diagonal(dim1=-2, dim2=-1).add_(a)
        X = torch.bmm(B, X)
    return finish(X, tall, batch_shape)


def newton_schulz_baddbmm(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: CoefficientSpec = "moonlight",
    dtype: torch.dtype = torch.bfloat16,
    eps: float = NS_EPS,
) -> torch.Tensor:
    """The same with ``X = baddbmm(X, B, X, beta=a)`` (``a X`` in the GEMM epilogue instead of
    on the diagonal of ``B``); kept so the benchmark can show what the fold buys."""
    abc = resolve_coefficients(coefficients, steps)
    X, tall, batch_shape = prepare(G, dtype, eps)
    for a, b, c in abc:
        M = torch.bmm(X, X.mT)
        B = torch.baddbmm(M, M, M, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return finish(X, tall, batch_shape)
