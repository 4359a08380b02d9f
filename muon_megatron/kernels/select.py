"""Choosing a Newton-Schulz backend per bucket shape, by measurement.

:class:`BackendChooser` times every available backend once per ``(batch, rows, cols, steps,
dtype, device)`` on random data of that shape (never zeros: they run faster than real data),
keeps the fastest, and remembers it. On a CPU, when only one backend is available, or for a
bucket under ``min_timed_flops`` (launch-bound: cuBLAS wins there, and timing would cost a Triton
compile per shape for nothing), it returns the first candidate (``torch_batched``) without timing. The table it built is :attr:`BackendChooser.table`
(JSON-ready), and a saved table can be passed back in to skip the timing.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import torch

from ..core.newton_schulz import CoefficientSpec
from .registry import NS_BACKENDS, available_backends

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("torch_batched", "triton_symmetric")
#: Buckets below this many Newton-Schulz FLOPs per call are not timed. On the H200 the one-triangle
#: Triton kernel lost to cuBLAS on every bucket under about 0.3 TFLOP (one 2048 x 2048 matrix:
#: 232 vs 496 TFLOP/s) and won from about 1 TFLOP (benchmarks/results/issue7_h200.md).
MIN_TIMED_FLOPS = 5e11


def bucket_flops(batch: int, rows: int, cols: int, steps: int) -> float:
    """Dense Newton-Schulz FLOPs of one call on ``batch`` matrices: ``(4 m^2 n + 2 m^3)`` per
    step and matrix, ``m = min(rows, cols)``, ``n = max(rows, cols)``."""
    m, n = min(rows, cols), max(rows, cols)
    return float(batch) * steps * (4 * m * m * n + 2 * m ** 3)


def time_call(fn, *, warmup: int = 2, reps: int = 5) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


class BackendChooser:
    """Per-shape backend choice, measured once and cached.

    Args:
        candidates: backend names to consider (unavailable ones are skipped).
        table: a previous :attr:`table` (``{key: name}``) to reuse without timing.
        warmup, reps: timing repetitions per candidate (the first call of a Triton backend
            also autotunes; that happens inside warm-up).
        min_timed_flops: buckets of fewer Newton-Schulz FLOPs per call (:func:`bucket_flops`) get
            the first candidate untimed.
    """

    def __init__(self, candidates: Sequence[str] = DEFAULT_CANDIDATES, *, table: Optional[dict] = None,
                 warmup: int = 2, reps: int = 5, min_timed_flops: float = MIN_TIMED_FLOPS):
        unknown = [c for c in candidates if c not in NS_BACKENDS]
        if unknown:
            raise ValueError(f"unknown backends {unknown}; valid names: {sorted(NS_BACKENDS)}")
        self.candidates = tuple(candidates)
        self.table: dict[str, str] = dict(table or {})
        self.timings: dict[str, dict[str, float]] = {}
        self.warmup, self.reps = warmup, reps
        self.min_timed_flops = min_timed_flops

    @staticmethod
    def key(batch: int, rows: int, cols: int, steps: int, dtype: torch.dtype, device: torch.device) -> str:
        return f"{torch.device(device).type}:{str(dtype).replace('torch.', '')}:{batch}x{rows}x{cols}:s{steps}"

    def choose(self, batch: int, rows: int, cols: int, *, steps: int = 5, coefficients: CoefficientSpec = "moonlight",
               dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> str:
        """The backend name to use for a ``(batch, rows, cols)`` bucket."""
        device = torch.device(device)
        key = self.key(batch, rows, cols, steps, dtype, device)
        if key in self.table:
            return self.table[key]
        names = [c for c in self.candidates if c in available_backends(device, dtype)]
        if device.type != "cuda" or len(names) <= 1 or bucket_flops(batch, rows, cols, steps) < self.min_timed_flops:
            choice = names[0] if names else "torch_batched"
        else:
            G = torch.randn(batch, rows, cols, device=device, dtype=torch.float32)
            timings = {}
            for name in names:
                fn = NS_BACKENDS[name].fn
                try:
                    timings[name] = time_call(lambda: fn(G, steps, coefficients, dtype), warmup=self.warmup,
                                              reps=self.reps)
                except Exception as err:  # a backend that fails to build is simply not chosen
                    logger.warning("Newton-Schulz backend %s failed on %s: %s", name, key, err)
            choice = min(timings, key=timings.get) if timings else "torch_batched"
            self.timings[key] = timings
            del G
        self.table[key] = choice
        return choice
