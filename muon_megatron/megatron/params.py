"""Translate megatron-core parameters into the core's terms: route, split, tensor-parallel shard.

For every trainable parameter of the model chunks, :func:`describe_parameters` returns a
:class:`MegatronParam`: a key (unique inside the ranks that can hold pieces of it), whether Muon or
AdamW updates it (the core's one routing rule, :func:`muon_megatron.core.routing.route_parameters`,
with embeddings known from module types), its :class:`SplitSpec` and, for a tensor-parallel
parameter, the rectangle of the full 2-D view this rank holds. This module is the only place that
reads Megatron's parameter attributes (``tensor_model_parallel``, ``partition_dim``,
``allreduce``) and module types.

How Megatron's fused weights appear (megatron-core 0.16 and 0.19):

- ``linear_qkv.weight``: ``[groups * (q_per_group + 2) * head_dim, hidden]`` per query group
  ``[q heads..., k, v]``; tensor parallelism splits whole query groups along dim 0, so the
  concatenation of the TP shards is the full weight: :class:`FusedQKV`.
- ``linear_fc1.weight`` with a gated linear unit (SwiGLU): each TP shard is ``[gate_t; up_t]``;
  the concatenation of the shards is ``[gate_0; up_0; gate_1; up_1; ...]``:
  ``GateUp(num_shards=tp)``. The same holds for shared experts, SequentialMLP's
  ``local_experts.<i>.linear_fc1.weight`` and TEGroupedMLP's ``linear_fc1.weight<i>`` (with the
  expert-tensor-parallel size).
- MLA projections (``linear_q_proj``, ``linear_q_down_proj``, ``linear_q_up_proj``,
  ``linear_kv_down_proj``, ``linear_kv_up_proj``), ``linear_proj``, ``linear_fc2`` and the
  router are plain matrices (:class:`Whole`), sharded along ``partition_dim`` or replicated.
- Expert parameters (``allreduce`` False) are sharded over the expert-tensor-parallel group.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..core.routing import route_parameters
from ..core.splits import FusedQKV, GateUp, SplitSpec, Whole
from ..distributed.comm import collective_device
from ..distributed.layout import ParamLayout, Rect, tensor_parallel_full_shape, tensor_parallel_shard
from .config import MuonSettings

logger = logging.getLogger(__name__)

_FC1 = re.compile(r"(^|\.)linear_fc1\.weight\d*$")
_QKV = re.compile(r"(^|\.)linear_qkv\.weight$")
_LEGACY_GROUPED = re.compile(r"(^|\.)experts\.weight[12]$")
# Routed experts of megatron-core's MoE layers (SequentialMLP, TEGroupedMLP, GroupedMLP); shared
# experts live under ``shared_experts.`` and are dense.
_ROUTED_EXPERT = re.compile(r"(^|\.)experts\.")


@dataclass(frozen=True)
class MegatronParam:
    """One trainable parameter of one model chunk, described for the optimizer.

    ``key``: name used to match pieces across ranks (``chunk<i>.`` + the parameter name with
    ``module.`` wrappers removed); ``use_muon``: the routing decision; ``split``: its split spec
    (None for AdamW); ``full_shape``: shape of the full (tensor-parallel-unsharded) parameter;
    ``shard``: this rank's rectangle of the full view, or None when it holds all of it;
    ``is_expert``: an expert-parallel parameter (``allreduce`` False).
    """

    key: str
    name: str
    param: torch.nn.Parameter
    use_muon: bool
    split: Optional[SplitSpec]
    full_shape: tuple[int, ...]
    shard: Optional[Rect]
    is_expert: bool

    def layout(self, flat_range: Optional[tuple[int, int]] = None) -> ParamLayout:
        """The core's description of this rank's piece (``flat_range`` of the local shard)."""
        if not self.use_muon:
            raise ValueError(f"parameter {self.name!r} is routed to AdamW; it has no Muon layout")
        return ParamLayout(self.key, self.full_shape, self.split, self.shard, flat_range)


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _tp_size_rank(is_expert: bool) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if is_expert:
        return ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _shard(name: str, p: torch.Tensor, is_expert: bool) -> tuple[tuple[int, ...], Optional[Rect]]:
    """Full shape and this rank's rectangle for a 2-D parameter, from Megatron's TP attributes."""
    local = tuple(p.shape)
    if not getattr(p, "tensor_model_parallel", False):
        return local, None
    tp, rank = _tp_size_rank(is_expert)
    if tp == 1:
        return local, None
    dim = getattr(p, "partition_dim", None)
    if p.ndim != 2 or dim not in (0, 1):
        raise ValueError(
            f"parameter {name!r}: tensor-parallel with partition_dim={dim} and shape {local}; muon-megatron "
            "handles 2-D weights split along dim 0 or 1. Route it to AdamW with --muon-adamw-params"
        )
    full = tensor_parallel_full_shape(local, dim, tp)
    return full, tensor_parallel_shard(full, dim, tp, rank)


def _split_for(name: str, p: torch.Tensor, config, settings: MuonSettings, is_expert: bool) -> SplitSpec:
    if _LEGACY_GROUPED.search(name):
        raise ValueError(
            f"parameter {name!r} is a legacy GroupedMLP weight (all local experts in one tensor); "
            "muon-megatron needs one tensor per expert: use --moe-grouped-gemm with Transformer Engine "
            "(TEGroupedMLP) or SequentialMLP, or route it to AdamW with --muon-adamw-params"
        )
    if p.ndim != 2:
        raise ValueError(
            f"parameter {name!r} of shape {tuple(p.shape)} is routed to Muon but is not 2-D; route it to "
            "AdamW with --muon-adamw-params"
        )
    tp, _ = _tp_size_rank(is_expert)
    if _QKV.search(name) and settings.split_qkv:
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        head_dim = config.kv_channels
        if heads % groups:
            raise ValueError(f"parameter {name!r}: {heads} heads do not divide into {groups} query groups")
        return FusedQKV(num_query_groups=groups, q_per_group=heads // groups, head_dim=head_dim)
    if _FC1.search(name) and settings.split_fc1 and getattr(config, "gated_linear_unit", False):
        return GateUp(num_shards=tp if getattr(p, "tensor_model_parallel", False) else 1, axis=0)
    return Whole()


def _embedding_names(chunk: torch.nn.Module) -> list[str]:
    names = []
    for mod_name, module in chunk.named_modules():
        if isinstance(module, torch.nn.Embedding) or type(module).__name__ in (
            "VocabParallelEmbedding",
            "LanguageModelEmbedding",
        ):
            for p_name, _ in module.named_parameters(recurse=type(module).__name__ == "LanguageModelEmbedding"):
                names.append(_strip(f"{mod_name}.{p_name}" if mod_name else p_name))
    return names


def describe_parameters(model_chunks: Sequence[torch.nn.Module], settings: MuonSettings) -> list[MegatronParam]:
    """Describe every trainable parameter of ``model_chunks`` (this rank's view).

    Raises ValueError naming the parameter when one routed to Muon cannot be split or sharded as
    declared, and when a ``--muon-adamw-params`` / ``--muon-params`` pattern matches no parameter
    of any rank (checked with one all-reduce when torch.distributed is initialised).
    """
    out: list[MegatronParam] = []
    used: dict[str, int] = {p: 0 for p in (*settings.adamw_params, *settings.muon_params)}
    for index, chunk in enumerate(model_chunks):
        config = _model_config(chunk)
        named = [(_strip(n), p) for n, p in chunk.named_parameters() if p.requires_grad]
        for pattern in used:
            used[pattern] += sum(fnmatch.fnmatchcase(n, pattern) for n, _ in named)
        routes = route_parameters(
            named,
            adamw=[p for p in settings.adamw_params if any(fnmatch.fnmatchcase(n, p) for n, _ in named)],
            muon=[p for p in settings.muon_params if any(fnmatch.fnmatchcase(n, p) for n, _ in named)],
            embedding_or_head=_embedding_names(chunk),
        )
        for name, p in named:
            is_expert = not getattr(p, "allreduce", True)
            if not is_expert and _ROUTED_EXPERT.search(name):
                check_expert_gradient_group(name)
            use_muon = routes[name]
            split, full_shape, shard = None, tuple(p.shape), None
            if use_muon:
                split = _split_for(name, p, config, settings, is_expert)
                full_shape, shard = _shard(name, p, is_expert)
                ParamLayout(name, full_shape, split, shard).validate()
            out.append(MegatronParam(f"chunk{index}.{name}", name, p, use_muon, split, full_shape, shard, is_expert))
    _check_patterns_matched(used)
    return out


def wrong_expert_layout(tp: int, etp: int, ep: int) -> Optional[str]:
    """Why megatron-core trains routed experts wrongly under this layout, or None.

    Releases that mark expert weights as expert-parallel (``allreduce=False``) only when expert
    parallel > 1 (megatron-core 0.16 to 0.18) keep them, with expert parallel 1, in the dense gradient
    buffer, whose reduction runs over data parallelism. With an expert-tensor-parallel size other
    than the tensor-parallel size that group is wrong for them: with expert TP larger, it holds
    different shards of the same expert and averages their gradients (measured: 0.16.1, TP 1,
    expert TP 2); with expert TP smaller, the tensor-parallel ranks holding copies of one shard see
    different tokens (sequence parallelism) and their gradients are never combined (the same
    reasoning; not measurable on the CPU, where MoE with TP cannot run). Releases that mark them
    whenever the two sizes differ (0.19) reduce them over their expert-data-parallel group and are
    right; the adapter only asks this where a parameter is still marked dense."""
    if ep == 1 and etp != tp:
        if etp > tp:
            what = (f"which averages the {etp // tp} different expert-tensor-parallel shards of each expert it holds "
                    "with each other")
        else:
            what = (f"which never combines the gradients of the {tp // etp} tensor-parallel ranks that hold copies of "
                    "the same expert shard but see different tokens")
        return (
            f"tensor parallel {tp}, expert tensor parallel {etp} and expert parallel 1: this megatron-core keeps "
            f"the routed experts in the dense gradient buffer and reduces their gradients over data parallelism, "
            f"{what}, so every optimizer trains the experts wrongly. Use --expert-model-parallel-size >= 2, or "
            f"--expert-tensor-parallel-size {tp} (equal to --tensor-model-parallel-size), or megatron-core >= 0.19"
        )
    return None


def check_expert_gradient_group(name: str) -> None:
    """ValueError when routed-expert parameter ``name``, which megatron-core reduces as a dense one
    (``allreduce`` True), is cut over an expert-tensor-parallel group that data parallelism
    averages (:func:`wrong_expert_layout`)."""
    from megatron.core import parallel_state as ps

    why = wrong_expert_layout(ps.get_tensor_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size(),
                              ps.get_expert_model_parallel_world_size())
    if why:
        raise ValueError(f"muon-megatron refuses this layout for {name!r}: {why}")


def _check_patterns_matched(used: dict[str, int]) -> None:
    if not used:
        return
    counts = torch.tensor(list(used.values()), dtype=torch.int64, device=collective_device())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    unmatched = [p for p, c in zip(used, counts.tolist()) if c == 0]
    if unmatched:
        raise ValueError(
            f"--muon-adamw-params / --muon-params pattern(s) {unmatched} match no trainable parameter on any "
            "rank; patterns are fnmatch patterns on names such as 'decoder.layers.0.mlp.linear_fc1.weight'"
        )


def _model_config(chunk: torch.nn.Module):
    module = chunk
    while not hasattr(module, "config") and hasattr(module, "module"):
        module = module.module
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"model chunk {type(chunk).__name__} has no TransformerConfig (.config)")
    return config
