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
operands (the core's :func:`~muon_megatron.core.newton_schulz.iterate_newton_schulz` frame, batched). Equal to the core within ``dtype`` rounding, not bitwise.
"""

from __future__ import annotations

import torch

from ..core.newton_schulz import NS_EPS, CoefficientSpec, iterate_newton_schulz


def _fused_iteration(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    M = torch.bmm(X, X.mT)
    B = torch.baddbmm(M, M, M, beta=b, alpha=c)
    B.diagonal(dim1=-2, dim2=-1).add_(a)
    return torch.bmm(B, X)


def _baddbmm_iteration(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    M = torch.bmm(X, X.mT)
    B = torch.baddbmm(M, M, M, beta=b, alpha=c)
    return torch.baddbmm(X, B, X, beta=a, alpha=1.0)


def batched_backend(iteration, name: str, doc: str, check=None):
    """A Newton-Schulz backend with the core's signature ``fn(G, steps=5, coefficients="moonlight",
    dtype=torch.bfloat16, eps=NS_EPS)``: the core's frame
    (:func:`~muon_megatron.core.newton_schulz.iterate_newton_schulz`, batched, row-major) around
    ``iteration(X, a, b, c)``. ``check(dtype)``, if given, refuses a dtype first (ValueError)."""

    def newton_schulz_backend(
        G: torch.Tensor,
        steps: int = 5,
        coefficients: CoefficientSpec = "moonlight",
        dtype: torch.dtype = torch.bfloat16,
        eps: float = NS_EPS,
    ) -> torch.Tensor:
        if check is not None:
            check(dtype)
        return iterate_newton_schulz(G, steps, coefficients, dtype, eps, iteration, batched=True)

    newton_schulz_backend.__name__ = newton_schulz_backend.__qualname__ = name
    newton_schulz_backend.__doc__ = doc
    return newton_schulz_backend


newton_schulz_fused = batched_backend(
    _fused_iteration, "newton_schulz_fused",
    """:func:`muon_megatron.core.newton_schulz` with three matmul launches per iteration (plus the
    diagonal add). Works on any device and dtype torch's ``baddbmm`` supports; ``G`` is not
    modified.""",
)

newton_schulz_baddbmm = batched_backend(
    _baddbmm_iteration, "newton_schulz_baddbmm",
    """The same with ``X = baddbmm(X, B, X, beta=a)`` (``a X`` in the GEMM epilogue instead of on
    the diagonal of ``B``); kept so the benchmark can show what the fold buys.""",
)
