"""Distributed Muon: full-matrix Newton-Schulz over tensor-parallel shards and ZeRO-1 partitions.

Layers, each importing only the ones above it: :mod:`.layout` (frozen descriptions of where each
logical matrix lives), :mod:`.plan` (pure planner: owners balanced by NS FLOPs, buckets, traffic),
:mod:`.runtime` (the collectives of one step), :mod:`.optimizer` (``DistributedMuon``).
Process groups are always passed in explicitly. Imports torch and ``muon_megatron.core`` only.
"""

from .comm import any_rank, collective_device
from .layout import (
    AlignedLayout,
    AlignItem,
    MatrixHolding,
    ParamLayout,
    ParamSpec,
    PieceRect,
    aligned_layout,
    bucketed_layouts,
    flat_layouts,
    holdings,
    matrix_name,
    tensor_parallel_full_shape,
    tensor_parallel_shard,
)
from .optimizer import DistributedMuon
from .plan import MatrixPlan, Plan, PlanError, make_plan, ns_flops
from .runtime import MuonExchange

__all__ = [
    "AlignItem", "AlignedLayout", "any_rank", "DistributedMuon", "MatrixHolding", "MatrixPlan", "MuonExchange", "ParamLayout",
    "ParamSpec", "PieceRect", "Plan", "PlanError", "aligned_layout", "collective_device", "bucketed_layouts", "flat_layouts", "holdings",
    "make_plan", "matrix_name", "ns_flops", "tensor_parallel_full_shape", "tensor_parallel_shard",
]
