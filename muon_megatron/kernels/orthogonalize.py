"""Newton-Schulz over many matrices: bucket them, stack, run each bucket on its backend.

:func:`orthogonalize_grouped` is a drop-in for :func:`muon_megatron.core.orthogonalize_batched`
(same arguments plus ``backend``), returning results in input order.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..core.newton_schulz import NS_EPS, CoefficientSpec
from ..core.update import orthogonalize_batched
from .buckets import NSBucket, NSBuckets, ns_buckets
from .registry import NS_BACKENDS, get_backend
from .select import BackendChooser

BackendSpec = Union[str, BackendChooser]


def resolve_backend(backend: BackendSpec, bucket: NSBucket, *, steps: int, coefficients: CoefficientSpec,
                    dtype: torch.dtype, device: torch.device) -> str:
    """The backend name for ``bucket``: a fixed name, or a chooser's measured pick ('auto')."""
    if isinstance(backend, BackendChooser):
        return backend.choose(bucket.batch, *bucket.shape, steps=steps, coefficients=coefficients, dtype=dtype,
                              device=device)
    if backend == "auto":
        raise ValueError("backend='auto' needs a BackendChooser instance to remember its measurements")
    get_backend(backend)
    return backend


def stack_bucket(matrices: Sequence[torch.Tensor], bucket: NSBucket, dtype: torch.dtype) -> torch.Tensor:
    """The bucket's input: its matrices cast to ``dtype`` and stacked, zero-padded to ``bucket.shape``."""
    if not bucket.padded:
        return torch.stack([matrices[i].to(dtype) for i in bucket.indices])
    ref = matrices[bucket.indices[0]]
    out = torch.zeros((bucket.batch, *bucket.shape), dtype=dtype, device=ref.device)
    for j, i in enumerate(bucket.indices):
        m, n = matrices[i].shape
        out[j, :m, :n] = matrices[i]
    return out


def orthogonalize_grouped(
    matrices: Sequence[torch.Tensor],
    *,
    steps: int = 5,
    coefficients: CoefficientSpec = "moonlight",
    dtype: torch.dtype = torch.bfloat16,
    eps: float = NS_EPS,
    backend: BackendSpec = "torch_batched",
    buckets: Optional[NSBuckets] = None,
) -> list[torch.Tensor]:
    """Newton-Schulz on every 2-D matrix of ``matrices`` (any mix of shapes), in input order.

    Results are ``dtype`` tensors of each input's shape (views into the bucket outputs). Equal
    to :func:`muon_megatron.core.newton_schulz` on each matrix alone within ``dtype`` rounding.
    ``buckets`` defaults to :func:`.buckets.ns_buckets` of the shapes.
    """
    if not matrices:
        return []
    if any(M.ndim != 2 for M in matrices):
        raise ValueError("orthogonalize_grouped takes 2-D matrices; split 3-D expert stacks first")
    if buckets is None:
        buckets = ns_buckets([tuple(M.shape) for M in matrices], steps=steps)
    if buckets.num_matrices != len(matrices):
        raise ValueError(f"the buckets cover {buckets.num_matrices} matrices, got {len(matrices)}")
    device = matrices[0].device
    out: list[Optional[torch.Tensor]] = [None] * len(matrices)
    for bucket in buckets.buckets:
        name = resolve_backend(backend, bucket, steps=steps, coefficients=coefficients, dtype=dtype, device=device)
        result = get_backend(name).fn(stack_bucket(matrices, bucket, dtype), steps, coefficients, dtype, eps)
        for j, i in enumerate(bucket.indices):
            m, n = matrices[i].shape
            out[i] = result[j, :m, :n] if bucket.padded else result[j]
    return out  # type: ignore[return-value]


class GraphedNewtonSchulz:
    """Newton-Schulz of one fixed ``(batch, rows, cols)`` shape replayed from a CUDA graph.

    For launch-bound shapes (MOONLIGHT.md: one 576 x 2048 or 64 x 2048 matrix takes ~1 ms, all
    launch overhead): the ~20 launches of a 5-step call become one graph launch. ``input`` is a
    static tensor to copy the matrices into; :meth:`__call__` returns the static output tensor,
    overwritten by the next call. Captured after one eager warm-up (Triton autotuning and
    cuBLAS handle creation must not happen during capture).
    """

    def __init__(self, batch: int, rows: int, cols: int, *, backend: str = "torch_batched", steps: int = 5,
                 coefficients: CoefficientSpec = "moonlight", dtype: torch.dtype = torch.bfloat16,
                 eps: float = NS_EPS, device: torch.device | str = "cuda"):
        fn = get_backend(backend).fn
        self.input = torch.randn(batch, rows, cols, dtype=dtype, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(self.input, steps, coefficients, dtype, eps)  # warm-up / autotune
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(self.input, steps, coefficients, dtype, eps)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


#: ``ns_backend`` values of the engine adapters besides the registry's names.
ADAPTER_BACKENDS = ("auto", "torch")


class AutoOrthogonalizer:
    """The adapters' ``ns_backend="auto"``: on CUDA, :func:`orthogonalize_grouped` with one
    :class:`BackendChooser` (each bucket shape timed once, on its first step, then cached); on any
    other device the core's :func:`~muon_megatron.core.update.orthogonalize_batched`."""

    def __init__(self, chooser: Optional[BackendChooser] = None):
        self.chooser = chooser or BackendChooser()

    def __call__(self, matrices: Sequence[torch.Tensor], *, steps: int = 5, coefficients: CoefficientSpec = "moonlight",
                 dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
        if matrices and matrices[0].is_cuda:
            return orthogonalize_grouped(matrices, steps=steps, coefficients=coefficients, dtype=dtype,
                                         backend=self.chooser)
        return orthogonalize_batched(matrices, steps=steps, coefficients=coefficients, dtype=dtype)


def check_backend_name(name: str, option: str) -> None:
    """ValueError naming ``option`` unless ``name`` is "auto", "torch" or a registry name."""
    if name not in ADAPTER_BACKENDS and name not in NS_BACKENDS:
        raise ValueError(f"{option} {name!r} is not a Newton-Schulz backend; choose one of "
                         f"{list(ADAPTER_BACKENDS) + sorted(NS_BACKENDS)}")


def orthogonalizer(name: str):
    """The ``orthogonalize=`` callable of :class:`muon_megatron.Muon` and
    :class:`muon_megatron.distributed.DistributedMuon` for an adapter's ``ns_backend`` setting:
    None for "torch" (the core's batched torch path), an :class:`AutoOrthogonalizer` for "auto",
    else :func:`orthogonalize_grouped` with that registry backend for every bucket."""
    check_backend_name(name, "ns_backend")
    if name == "torch":
        return None
    if name == "auto":
        return AutoOrthogonalizer()

    def fixed(matrices, *, steps=5, coefficients="moonlight", dtype=torch.bfloat16):
        return orthogonalize_grouped(matrices, steps=steps, coefficients=coefficients, dtype=dtype, backend=name)

    fixed.backend = name
    return fixed
