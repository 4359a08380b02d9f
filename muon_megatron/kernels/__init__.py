"""GPU speed for the Muon step: Newton-Schulz backends behind the core's one signature, a bucket
shape buckets (:mod:`.buckets`), per-shape backend selection by measurement, CUDA-graph replay for launch-bound shapes,
and a fused element-wise step runtime (issue 7).

Everything here imports torch and ``muon_megatron.core`` only; Triton is optional and imported
lazily (``ns_triton.triton_importable()``); without it, or on a CPU, the pure-torch paths run.
Backends are listed in :mod:`.registry` (its docstring says how to add one).
"""

from .fused_muon import FusedMuon
from .ns_torch import newton_schulz_fused
from .ns_triton import newton_schulz_triton, symmetric_product, triton_importable
from .orthogonalize import (
    ADAPTER_BACKENDS,
    AutoOrthogonalizer,
    GraphedNewtonSchulz,
    check_backend_name,
    orthogonalize_grouped,
    orthogonalizer,
)
from .buckets import NSBucket, NSBuckets, ns_flops, ns_buckets
from .registry import NS_BACKENDS, NSBackend, available_backends, get_backend
from .select import BackendChooser, time_call
from .step import MuonStepRuntime

__all__ = [
    "ADAPTER_BACKENDS", "AutoOrthogonalizer", "BackendChooser", "FusedMuon", "GraphedNewtonSchulz", "MuonStepRuntime", "NSBackend", "NSBucket", "NSBuckets", "NS_BACKENDS",
    "available_backends", "check_backend_name", "get_backend", "newton_schulz_fused", "newton_schulz_triton", "ns_flops",
    "orthogonalize_grouped", "orthogonalizer", "ns_buckets", "symmetric_product", "time_call", "triton_importable",
]
