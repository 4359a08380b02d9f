"""``MuonStepRuntime``: Moonlight's Muon step (paper eq. 4) for a fixed list of matrix parameters,
with the element-wise work fused over all matrices of a bucket and Newton-Schulz batched.

Per Newton-Schulz bucket (:mod:`.buckets`), three launches plus Newton-Schulz:

1. ``momentum_gather`` (one launch for every matrix of the bucket): ``buf = mu * buf + g`` in
   place, and the Newton-Schulz input ``g + mu * buf`` (Nesterov) rounded to ``ns_dtype`` written
   straight into the stacked, zero-padded bucket tensor. Reads g and buf, writes buf and the bf16
   input: 14 bytes per element instead of the ~30 of separate torch ops.
2. Newton-Schulz on the bucket (backend chosen per shape, :mod:`.select`).
3. ``apply_update`` (one launch): ``W = W * (1 - lr * wd) - lr * scale(A, B) * O``.

Tall matrices (rows > cols) are gathered transposed, in tiles, so their bucket is already wide
and row-major; Newton-Schulz of ``G^T`` is the transpose of Newton-Schulz of ``G``, and the apply
kernel reads the result back transposed. No transposing copy runs inside Newton-Schulz.

Buckets are processed one after another, so the transient memory is one bucket's Newton-Schulz
working set (bounded by ``max_batch``), and the persistent state is the fp32
momentum alone: 4 bytes per parameter against AdamW's 8.

The Triton element-wise path needs fp32 contiguous parameters and gradients on a CUDA device
(Megatron's and DeepSpeed's main params and grads are); otherwise ``torch._foreach`` ops do the
same work (more passes over memory, still no per-parameter launch in Python).

Promise: for each matrix, the update of :class:`muon_megatron.core.Muon` (sum-form momentum,
the same ``momentum_buffer`` values) within ``ns_dtype`` rounding; not bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..core.hyperparams import check_hyperparameters
from ..core.newton_schulz import NS_EPS, CoefficientSpec
from ..core.update import apply_orthogonal_, decay_, momentum_, update_scale as scale_for
from . import ns_triton
from .orthogonalize import BackendSpec, stack_bucket
from .buckets import DEFAULT_LAUNCH_COST_FLOPS, NSBuckets, ns_buckets
from .registry import get_backend
from .select import BackendChooser

ELEMENTWISE_BLOCK = 4096
TRANSPOSE_TILE = 64


@dataclass
class _BucketTables:
    """Device tables of one bucket for the Triton element-wise kernels (matrix order = bucket order)."""

    matrices: slice            # range in the runtime's bucket-ordered matrix list
    buf_ptrs: torch.Tensor
    param_ptrs: torch.Tensor
    offsets: torch.Tensor      # element offset of each matrix inside the bucket tensor
    numels: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    ld: torch.Tensor
    scales: torch.Tensor
    chunk_matrix: torch.Tensor
    chunk_start: torch.Tensor
    transposed: bool          # tall bucket stored wide: (batch, cols, rows)


def matrices_of(param: torch.Tensor) -> list[tuple[Optional[int], tuple[int, int]]]:
    """``(expert index or None, (rows, cols))`` for each matrix a 2-D or 3-D (``[E, m, n]``) parameter holds."""
    if param.ndim == 2:
        return [(None, (int(param.shape[0]), int(param.shape[1])))]
    if param.ndim == 3:
        return [(e, (int(param.shape[1]), int(param.shape[2]))) for e in range(param.shape[0])]
    raise ValueError(f"MuonStepRuntime takes 2-D matrices or 3-D [E, m, n] expert stacks, got shape {tuple(param.shape)}")


class MuonStepRuntime:
    """The Muon step for ``params`` (2-D matrices or 3-D ``[E, m, n]`` expert stacks).

    Args:
        params: the matrix parameters (their storage must not move between steps).
        momentum, nesterov, ns_steps, ns_coefficients, ns_dtype, update_scale: as in
            :class:`muon_megatron.core.Muon`.
        backend: a Newton-Schulz backend name, or a :class:`BackendChooser` (default: a new
            chooser, i.e. measured per bucket shape on the first step).
        elementwise: "triton", "foreach" or "auto" (Triton where it can run).
        max_batch, launch_cost_flops: passed to :func:`.buckets.ns_buckets`.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: CoefficientSpec = "moonlight",
        ns_dtype: torch.dtype = torch.bfloat16,
        update_scale: str = "moonlight",
        backend: Union[str, BackendChooser, None] = None,
        elementwise: str = "auto",
        max_batch: int = 128,
        launch_cost_flops: float = DEFAULT_LAUNCH_COST_FLOPS,
        eps: float = NS_EPS,
    ):
        check_hyperparameters(dict(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                   ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, update_scale=update_scale))
        if elementwise not in ("auto", "triton", "foreach"):
            raise ValueError(f"elementwise must be 'auto', 'triton' or 'foreach', got {elementwise!r}")
        self.params = list(params)
        if not self.params:
            raise ValueError("MuonStepRuntime needs at least one parameter")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.ns_steps, self.ns_coefficients, self.ns_dtype, self.eps = ns_steps, ns_coefficients, ns_dtype, eps
        self.backend: BackendSpec = BackendChooser() if backend is None else backend
        if isinstance(self.backend, str):
            get_backend(self.backend)
        self.device = self.params[0].device
        # (param index, expert index or None, shape) per matrix, in parameter order
        entries = [(p, e, s) for p, param in enumerate(self.params) for e, s in matrices_of(param)]
        self.buckets: NSBuckets = ns_buckets([s for _, _, s in entries], steps=ns_steps, max_batch=max_batch,
                                         launch_cost_flops=launch_cost_flops)
        order = [i for bucket in self.buckets.buckets for i in bucket.indices]
        self._entries = [entries[i] for i in order]  # bucket order
        self._scales = [scale_for(update_scale, *s) for _, _, s in self._entries]
        self.buffers = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                        for p in self.params]
        can_triton = (
            ns_triton.triton_importable()
            and (self.device.type == "cuda" or ns_triton.triton_interpreting())
            and all(p.dtype == torch.float32 and p.is_contiguous() for p in self.params)
        )
        if elementwise == "triton" and not can_triton:
            raise ValueError("elementwise='triton' needs Triton, a CUDA device and fp32 contiguous parameters")
        self.elementwise = "triton" if (elementwise == "auto" and can_triton) or elementwise == "triton" else "foreach"
        # foreach path: per-matrix views of params and buffers, built once (storage is fixed)
        self._param_views = [self._view(self.params[p], e) for p, e, _ in self._entries]
        self._buf_views = [self._view(self.buffers[p], e) for p, e, _ in self._entries]
        self._tables: list[_BucketTables] = []
        if self.elementwise == "triton":
            self._build_tables()
        self._lr_wd = torch.zeros(2, dtype=torch.float32, device=self.device)

    @staticmethod
    def _view(t: torch.Tensor, e: Optional[int]) -> torch.Tensor:
        return t if e is None else t[e]

    def _build_tables(self) -> None:
        dev = self.device
        i64 = dict(dtype=torch.int64, device=dev)
        start = 0
        self._param_of = torch.tensor([p for p, _, _ in self._entries], **i64)
        self._byte_offset = torch.tensor(
            [0 if e is None else e * s[0] * s[1] * 4 for _, e, s in self._entries], **i64)
        for bucket in self.buckets.buckets:
            sl = slice(start, start + bucket.batch)
            start += bucket.batch
            mp, np_ = bucket.shape
            transposed = mp > np_
            numels, chunk_matrix, chunk_start = [], [], []
            for j, (_, _, (m, n)) in enumerate(self._entries[sl]):
                numels.append(m * n)
                if transposed:  # one program per TILE x TILE tile; start = first element's offset
                    starts = [r * n + c for r in range(0, m, TRANSPOSE_TILE) for c in range(0, n, TRANSPOSE_TILE)]
                else:
                    starts = list(range(0, m * n, ELEMENTWISE_BLOCK))
                chunk_matrix += [j] * len(starts)
                chunk_start += starts
            self._tables.append(_BucketTables(
                matrices=sl,
                buf_ptrs=torch.tensor([v.data_ptr() for v in self._buf_views[sl]], **i64),
                param_ptrs=torch.tensor([v.data_ptr() for v in self._param_views[sl]], **i64),
                offsets=torch.tensor([j * mp * np_ for j in range(bucket.batch)], **i64),
                numels=torch.tensor(numels, **i64),
                rows=torch.tensor([s[0] for _, _, s in self._entries[sl]], **i64),
                cols=torch.tensor([s[1] for _, _, s in self._entries[sl]], **i64),
                ld=torch.full((bucket.batch,), mp if transposed else np_, **i64),
                scales=torch.tensor(self._scales[sl], dtype=torch.float32, device=dev),
                chunk_matrix=torch.tensor(chunk_matrix, dtype=torch.int32, device=dev),
                chunk_start=torch.tensor(chunk_start, **i64),
                transposed=transposed,
            ))

    def state_bytes(self) -> int:
        """Bytes of persistent optimizer state (the fp32 momentum buffers)."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @torch.no_grad()
    def step_(self, grads: Sequence[torch.Tensor], *, lr: float, weight_decay: float) -> None:
        """One Muon step: updates ``params`` and the momentum buffers in place; ``grads`` (one per
        parameter, same shapes) are read only."""
        if len(grads) != len(self.params):
            raise ValueError(f"expected {len(self.params)} gradients, got {len(grads)}")
        if self.elementwise == "triton":
            self._step_triton(grads, lr, weight_decay)
        else:
            self._step_foreach(grads, lr, weight_decay)

    def _ns(self, bucket, X: torch.Tensor) -> torch.Tensor:
        # choose by the stacked tensor's own shape (a tall bucket may be stored wide)
        if isinstance(self.backend, BackendChooser):
            name = self.backend.choose(*X.shape, steps=self.ns_steps, coefficients=self.ns_coefficients,
                                       dtype=self.ns_dtype, device=self.device)
        else:
            name = self.backend
        return get_backend(name).fn(X, self.ns_steps, self.ns_coefficients, self.ns_dtype, self.eps)

    def _step_triton(self, grads, lr, weight_decay) -> None:
        from . import _triton_kernels as K

        for g, p in zip(grads, self.params):
            if g.dtype != torch.float32 or not g.is_contiguous() or g.shape != p.shape:
                raise ValueError("the Triton element-wise path needs fp32 contiguous gradients shaped like the params")
        self._lr_wd[0].fill_(lr)
        self._lr_wd[1].fill_(1.0 - lr * weight_decay)
        grad_ptrs = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64).to(self.device, non_blocking=True)
        all_grad_ptrs = grad_ptrs[self._param_of] + self._byte_offset
        for bucket, t in zip(self.buckets.buckets, self._tables):
            alloc = torch.zeros if bucket.padded else torch.empty
            shape = bucket.shape[::-1] if t.transposed else bucket.shape
            X = alloc((bucket.batch, *shape), dtype=self.ns_dtype, device=self.device)
            grid = (t.chunk_matrix.numel(),)
            grad_ptrs = all_grad_ptrs[t.matrices]
            if t.transposed:
                K.momentum_gather_t_kernel[grid](
                    grad_ptrs, t.buf_ptrs, X, t.offsets, t.rows, t.cols, t.ld, t.chunk_matrix, t.chunk_start,
                    self.momentum, NESTEROV=self.nesterov, TILE=TRANSPOSE_TILE,
                )
            else:
                K.momentum_gather_kernel[grid](
                    grad_ptrs, t.buf_ptrs, X, t.offsets, t.numels, t.cols, t.ld, t.chunk_matrix, t.chunk_start,
                    self.momentum, NESTEROV=self.nesterov, PADDED=bucket.padded, BLOCK=ELEMENTWISE_BLOCK,
                )
            O = self._ns(bucket, X)  # NS of the transposed (wide) stack is the transposed result
            del X
            if t.transposed:
                K.apply_update_t_kernel[grid](
                    t.param_ptrs, O, t.offsets, t.rows, t.cols, t.ld, t.scales, t.chunk_matrix, t.chunk_start,
                    self._lr_wd, TILE=TRANSPOSE_TILE,
                )
            else:
                K.apply_update_kernel[grid](
                    t.param_ptrs, O, t.offsets, t.numels, t.cols, t.ld, t.scales, t.chunk_matrix, t.chunk_start,
                    self._lr_wd, PADDED=bucket.padded, BLOCK=ELEMENTWISE_BLOCK,
                )

    def _step_foreach(self, grads, lr, weight_decay) -> None:
        # the core's update (muon_megatron.core.update), list form, bucket by bucket
        U = momentum_(self.buffers, grads, momentum=self.momentum, nesterov=self.nesterov)
        start = 0
        for bucket in self.buckets.buckets:
            sl = slice(start, start + bucket.batch)
            start += bucket.batch
            inputs = [self._view(U[p], e) for p, e, _ in self._entries[sl]]
            local = type(bucket)(bucket.shape, tuple(range(bucket.batch)), bucket.shapes)
            O = self._ns(bucket, stack_bucket(inputs, local, self.ns_dtype))
            params = self._param_views[sl]
            decay_(params, lr=lr, weight_decay=weight_decay)
            apply_orthogonal_(params, [O[j, :m, :n] for j, (_, _, (m, n)) in enumerate(self._entries[sl])],
                              [lr * s for s in self._scales[sl]])
