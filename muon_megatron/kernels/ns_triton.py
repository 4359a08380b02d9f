"""Newton-Schulz with the two symmetric products on a one-triangle Triton kernel.

Per iteration ``M = X X^T`` and ``B = c M M + b M`` are symmetric: the kernel computes the tiles
on and below the diagonal only and mirrors them, which saves up to a third of an iteration's
FLOPs (``4 m^2 n + 2 m^3`` become ``3 m^2 n + m^3`` as tiles shrink). ``a X`` is folded into
the diagonal of ``B`` by the kernel's epilogue, so ``X = (B + a I) X`` is a plain cuBLAS ``bmm``.

Used only where Triton imports, the tensor is on a CUDA device and ``dtype`` is bf16 or fp16;
:func:`available` says so, and :mod:`.select` picks it per shape only when it measures faster.
Same contract as :func:`muon_megatron.core.newton_schulz`: equal within ``dtype`` rounding, not
bitwise (fp32 accumulation, the ``b M`` term added before the single rounding).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .ns_torch import batched_backend

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


def triton_importable() -> bool:
    """True if the ``triton`` package can be imported (it is not a dependency of the project)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton path can run for tensors of ``dtype`` on ``device``."""
    if dtype not in _SUPPORTED_DTYPES or not triton_importable():
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return triton_interpreting()  # CPU only under Triton's interpreter (tests)


def _kernels():
    if not triton_importable():
        raise ImportError(
            "the 'triton_symmetric' Newton-Schulz backend needs the 'triton' package "
            "(pip install triton, or a CUDA build of PyTorch that ships it); use backend='torch_batched'"
        )
    from . import _triton_kernels

    return _triton_kernels


def symmetric_product(
    A: torch.Tensor, C: Optional[torch.Tensor] = None, *, alpha: float = 1.0, beta: float = 0.0, gamma: float = 0.0
) -> torch.Tensor:
    """``alpha * A @ A^T + beta * C + gamma * I`` for a batch ``A`` of shape ``(b, m, k)`` (any
    strides); ``beta`` and ``gamma`` apply only when ``C`` is given.

    ``C`` (shape ``(b, m, m)``) must be symmetric: only its lower triangle is read. Returns a new
    contiguous ``(b, m, m)`` tensor in ``A``'s dtype; off-diagonal tiles are exact mirrors, diagonal
    tiles symmetric within rounding.
    """
    if A.ndim != 3:
        raise ValueError(f"symmetric_product takes a (batch, m, k) tensor, got shape {tuple(A.shape)}")
    kernels = _kernels()
    b, m, k = A.shape
    out = torch.empty((b, m, m), dtype=A.dtype, device=A.device)
    Cx = C if C is not None else out  # unread when HAS_C is False

    def grid(meta):
        t = -(-m // meta["BLOCK"])
        return (t * (t + 1) // 2, b)

    kernels.symmetric_product_kernel[grid](
        A, Cx, out, m, k,
        A.stride(0), A.stride(1), A.stride(2), Cx.stride(0), Cx.stride(1), Cx.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        float(alpha), float(beta), float(gamma), HAS_C=C is not None,
    )
    return out


def _symmetric_iteration(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    M = symmetric_product(X)
    B = symmetric_product(M, M, alpha=c, beta=b, gamma=a)  # c M M + b M + a I
    return torch.bmm(B, X)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"triton_symmetric runs in bf16 or fp16, not {dtype}; use backend='torch_batched'")


newton_schulz_triton = batched_backend(
    _symmetric_iteration, "newton_schulz_triton",
    """:func:`muon_megatron.core.newton_schulz` with ``X X^T`` and ``c M M + b M`` on the
    one-triangle kernel. ``dtype`` must be bf16 or fp16; ``G`` is not modified.""",
    check=_check_dtype,
)
