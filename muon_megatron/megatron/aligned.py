"""Matrix-aligned DDP buffer layout (megatron-core >= 0.19): no extra Muon communication over DP.

megatron-core 0.19's ``DistributedDataParallel`` accepts a precomputed ``full_param_layout``
(where each parameter sits in its gradient/param buffer). :func:`aligned_param_layout` keeps
Megatron's buffers and buckets (same parameters per bucket) but reorders and pads each bucket so
that every parameter lies whole inside one DP rank's shard of it, Muon matrices balanced over the
ranks by Newton-Schulz FLOPs (the core's :func:`muon_megatron.distributed.aligned_layout`). The
distributed optimizer's reduce-scatter then delivers each matrix whole to one rank, and the Muon
engine needs no DP gather (tensor-parallel shards are still gathered). The cost is padding: up to
one parameter's worth per rank and bucket.

Use: ``DistributedDataParallel(config, ddp_config, module, full_param_layout=aligned_param_layout(
[p for p in module.parameters() if p.requires_grad], ddp_config.bucket_size, dp, ddp_config))``;
the signature is that of megatron-core's ``DistributedOptimizer.compute_full_param_layout``.
Balancing uses each 2-D parameter's full-matrix FLOPs (no split), as only balance depends on it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..core.newton_schulz import ns_flops
from ..distributed import AlignItem, aligned_layout

_ALIGN = 128  # elements; keeps parameter starts and bucket ends on Megatron's padding multiples


def _flops(p: torch.Tensor) -> float:
    if p.ndim < 2 or getattr(p, "shared_embedding", False):
        return 0.0
    rows, cols = p.shape[0], p.numel() // p.shape[0]
    return ns_flops(min(rows, cols), max(rows, cols))


def aligned_param_layout(
    params: Sequence[torch.nn.Parameter],
    bucket_size: Optional[int],
    data_parallel_world_size: int,
    ddp_config,
    expert_data_parallel_world_size: Optional[int] = None,
):
    """A ``FullParamLayout`` in which every parameter lies whole in one DP shard of its bucket.
    Raises ImportError on megatron-core releases without ``full_param_layout`` (before 0.19)."""
    try:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        from megatron.core.optimizer.param_layout import FullParamLayout, PerBufferParamLayout
    except ImportError as err:
        raise ImportError(
            "the matrix-aligned layout needs megatron-core >= 0.19 (DistributedDataParallel's "
            "full_param_layout); use --muon-layout gather"
        ) from err

    default = DistributedOptimizer.compute_full_param_layout(
        list(params), bucket_size, data_parallel_world_size, ddp_config,
        expert_data_parallel_world_size=expert_data_parallel_world_size,
    )
    layouts = {}
    for key, layout in default.layouts.items():
        dp = layout.num_optimizer_shards or data_parallel_world_size
        by_bucket: dict[int, list] = {}
        for p, (_, _, bucket) in layout.param_index_map.items():
            by_bucket.setdefault(bucket, []).append(p)
        placed, buckets, unpadded, start = {}, [], [], 0
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            names = {id(p): f"p{i}" for i, p in enumerate(members)}
            items = [AlignItem(names[id(p)], -(-p.numel() // _ALIGN) * _ALIGN, _flops(p)) for p in members]
            plan = aligned_layout(items, dp, align=_ALIGN)
            end_used = start
            for p in members:
                offset = start + plan.offsets[names[id(p)]]
                placed[p] = (offset, offset + p.numel(), bucket)
                end_used = max(end_used, offset + p.numel())
            end = start + dp * plan.partition_size
            buckets.append((start, end))
            unpadded.append(end_used - start)
            start = end
        index_map = {p: placed[p] for p in layout.param_index_map}  # keep Megatron's iteration order
        layouts[key] = PerBufferParamLayout(
            param_index_map=index_map,
            bucket_indices=buckets,
            per_bucket_numel_unpadded=unpadded,
            param_indices=layout.param_indices,
            num_optimizer_shards=dp,
        )
    return FullParamLayout(layouts=layouts)
