"""Newton-Schulz backends by name: every entry has the core's ``newton_schulz`` signature.

To add a backend, write ``fn(G, steps, coefficients, dtype, eps) -> Tensor`` honouring the
contract of :func:`muon_megatron.core.newton_schulz` (batch dims, orientation, a new tensor in
``dtype``), and an ``available(device, dtype)`` predicate; add an :class:`NSBackend` to
:data:`NS_BACKENDS`. :mod:`.select` then times it against the others per shape, and
``tests/kernels`` checks every entry that is available on the machine against float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core.newton_schulz import newton_schulz
from . import ns_triton
from .ns_torch import newton_schulz_baddbmm, newton_schulz_fused


def _always(device: torch.device, dtype: torch.dtype) -> bool:
    return True


@dataclass(frozen=True)
class NSBackend:
    """One Newton-Schulz implementation.

    name: registry key. fn: callable with the core ``newton_schulz`` signature.
    available: ``(device, dtype) -> bool``; False means ``fn`` must not be called there.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    available: Callable[[torch.device, torch.dtype], bool]


NS_BACKENDS: dict[str, NSBackend] = {
    # The core's reference form (bmm chain plus element-wise kernels); the baseline.
    "torch_reference": NSBackend("torch_reference", newton_schulz, _always),
    # Three matmul launches per iteration, scalars folded into the GEMM epilogue and a X into B.
    "torch_batched": NSBackend("torch_batched", newton_schulz_fused, _always),
    # The same with a X in the last GEMM's epilogue (baddbmm); for comparison.
    "torch_baddbmm": NSBackend("torch_baddbmm", newton_schulz_baddbmm, _always),
    # One-triangle Triton kernel for the two symmetric products.
    "triton_symmetric": NSBackend("triton_symmetric", ns_triton.newton_schulz_triton, ns_triton.available),
}


def get_backend(name: str) -> NSBackend:
    """The entry called ``name``; ValueError listing the valid names otherwise."""
    try:
        return NS_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown Newton-Schulz backend {name!r}; valid names: {sorted(NS_BACKENDS)} or 'auto'") from None


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Names of the backends that can run for ``dtype`` tensors on ``device``, registry order."""
    return [name for name, entry in NS_BACKENDS.items() if entry.available(torch.device(device), dtype)]
