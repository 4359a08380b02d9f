"""DeepSpeed's optimizer wrappers, described in the distributed engine's terms.

The only module that reads DeepSpeed's internal attributes. For each param group of
:class:`.optimizer.DeepSpeedMuon` it answers: which local tensors the wrapper put into the group,
which pieces of which parameters each tensor holds (:class:`ParamLayout` plus a flat offset), and
over which process group the pieces are spread.

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``): one flat fp32 partition per group. Its pieces come from
  the fragment map DeepSpeed keeps for universal checkpoints (``param._hp_mapping``: the
  parameter's flat element range ``lp_fragment_address`` and its place ``hp_fragment_address`` in
  the partition). A matrix straddling partition boundaries is simply held in pieces by several
  ranks; the distributed engine gathers it to one owner. Process group: the group's data-parallel
  group (for MoE expert groups, their expert-data-parallel group).
- ZeRO-0 without mixed precision (no wrapper): the model's own parameters, whole, replicated on
  every data-parallel rank; the engine still orthogonalises each matrix on one rank only and sends
  the result to the others.
- ZeRO-0 with fp16/bf16 (``FP16_UnfusedOptimizer``): one fp32 master copy per parameter, in order.
- Megatron-DeepSpeed tensor parallelism (an ``mpu`` given to ``deepspeed.initialize``): a
  parameter marked ``tensor_model_parallel`` with ``partition_dim`` 0 or 1 is this TP rank's
  slice of the full matrix (``ParamLayout.shard``); the process group then spans TP x DP (the
  whole world; pipeline parallelism is refused), so the full matrix is gathered for
  Newton-Schulz. Parameters replicated over TP are replicas; one of them is used.

Anything else (the BF16_Optimizer of ZeRO-1 with fp32 gradient accumulation, ZeRO-3, offload) is
refused with the setting to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..distributed import ParamLayout
from .optimizer import DeepSpeedMuon, GroupPieces

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in Megatron-DeepSpeed tensor parallelism (size 1: none)."""

    size: int = 1
    rank: int = 0

    @classmethod
    def from_engine(cls, engine) -> "TensorParallel":
        mpu = getattr(engine, "mpu", None)
        if mpu is None:
            return cls()
        from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank, bwc_tensor_model_parallel_world_size

        return cls(int(bwc_tensor_model_parallel_world_size(mpu)), int(bwc_tensor_model_parallel_rank(mpu)))

    def layout(self, name: str, param: torch.Tensor, split, flat_range=None) -> ParamLayout:
        """The layout of this rank's ``param`` (a TP slice when marked ``tensor_model_parallel``)."""
        shape = tuple(param.shape)
        if self.size == 1 or not getattr(param, "tensor_model_parallel", False):
            return ParamLayout(name, shape, split, None, flat_range)
        dim, stride = getattr(param, "partition_dim", None), getattr(param, "partition_stride", 1)
        if len(shape) != 2 or dim not in (0, 1) or stride != 1:
            raise ValueError(
                f"tensor-parallel parameter {name!r} (shape {shape}, partition_dim {dim}, partition_stride "
                f"{stride}): muon_megatron handles 2-D TP slices along dim 0 or 1 with stride 1; route it to "
                "AdamW with optimizer.params.adamw"
            )
        rows, cols = shape
        full = (rows * self.size, cols) if dim == 0 else (rows, cols * self.size)
        shard = (self.rank * rows, 0, rows, cols) if dim == 0 else (0, self.rank * cols, rows, cols)
        return ParamLayout(name, full, split, shard, flat_range)


def _data_parallel_group(engine):
    group = getattr(engine, "seq_data_parallel_group", None)
    return group if group is not None else getattr(engine, "data_parallel_group", None)


def _muon_group(tp: TensorParallel, dp_group, moe: bool):
    """The process group of a Muon group's pieces: its DP group, or TP x DP under tensor parallelism."""
    if tp.size == 1:
        return dp_group
    import torch.distributed as dist

    if moe:
        raise ValueError("muon_megatron's DeepSpeed Muon does not combine tensor parallelism with MoE expert groups yet")
    if tp.size * dist.get_world_size(dp_group) != dist.get_world_size():
        raise ValueError(
            f"tensor parallel {tp.size} x data parallel {dist.get_world_size(dp_group)} is not the whole world "
            f"({dist.get_world_size()} ranks): pipeline parallelism is not supported by muon_megatron's DeepSpeed Muon"
        )
    return dist.group.WORLD


def _whole_pieces(optimizer: DeepSpeedMuon, engine, tensors_per_group, wrapper: str) -> list[GroupPieces]:
    """Each group's tensors are whole-parameter copies, in the order the groups list them."""
    tp = TensorParallel.from_engine(engine)
    out = []
    for i, group in enumerate(optimizer.param_groups):
        tensors = tensors_per_group[i]
        names, originals = optimizer.names(i), optimizer.original_params(i)
        if len(tensors) != len(originals) or any(t.shape != p.shape for t, p in zip(tensors, originals)):
            raise RuntimeError(f"{wrapper}: param group {i} no longer holds one tensor per parameter")
        layouts, process_group = None, _data_parallel_group(engine)
        if group["use_muon"]:
            split = group.get("split")
            layouts = tuple([(tp.layout(n, p, split), 0)] for n, p in zip(names, originals))
            process_group = _muon_group(tp, process_group, bool(group.get("moe")))
        out.append(GroupPieces(tuple(tensors), layouts, process_group))
    return out


def zero_partition_pieces(zero, optimizer: DeepSpeedMuon, tp: TensorParallel = TensorParallel()) -> list[GroupPieces]:
    """Describe the flat fp32 partitions of DeepSpeed's ZeRO-1/2 optimizer (see module doc)."""
    out = []
    for i, group in enumerate(optimizer.param_groups):
        flat = zero.single_partition_of_fp32_groups[i]
        name_of = {id(p): n for p, n in zip(optimizer.original_params(i), optimizer.names(i))}
        layouts = None
        if group["use_muon"]:
            pieces = []
            for p in zero.bit16_groups[i]:
                if id(p) not in name_of:
                    raise RuntimeError(f"ZeRO param group {i} holds a parameter DeepSpeedMuon did not give it")
                if not hasattr(p, "_hp_mapping"):
                    raise RuntimeError(
                        "this DeepSpeed version keeps no fragment map (param._hp_mapping) for ZeRO-1/2; "
                        "muon_megatron needs DeepSpeed >= 0.10"
                    )
                mapping = p._hp_mapping
                if mapping is None:
                    continue  # no element of p in this rank's partition
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                layout = tp.layout(name_of[id(p)], p, group.get("split"), (lp.start, lp.start + lp.numel))
                pieces.append((layout, int(hp.start)))
            layouts = (tuple(pieces),)
            process_group = _muon_group(tp, zero.real_dp_process_group[i], bool(group.get("moe")))
        else:
            process_group = zero.real_dp_process_group[i]
        out.append(GroupPieces((flat,), layouts, process_group))
    return out


def describe(engine, optimizer: DeepSpeedMuon) -> tuple[list[GroupPieces], str]:
    """``(pieces per group, wrapper name)`` for the wrapper DeepSpeed built around ``optimizer``."""
    wrapper = engine.optimizer
    name = type(wrapper).__name__
    if wrapper is optimizer:
        tensors = [list(g["params"]) for g in optimizer.param_groups]
        return _whole_pieces(optimizer, engine, tensors, "ZeRO-0"), "ZeRO-0"
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        stage = "ZeRO-2" if wrapper.partition_gradients else "ZeRO-1"
        return zero_partition_pieces(wrapper, optimizer, TensorParallel.from_engine(engine)), stage
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(wrapper, FP16_UnfusedOptimizer):
        tensors = [list(g) for g in wrapper.fp32_groups]
        return _whole_pieces(optimizer, engine, tensors, "ZeRO-0 (FP16_UnfusedOptimizer)"), "ZeRO-0 " + name
    if name == "BF16_Optimizer":
        raise ValueError(
            "DeepSpeed chose its BF16_Optimizer (bf16 with ZeRO stage 1 and data_types.grad_accum_dtype fp32), "
            "which muon_megatron does not support yet: remove data_types.grad_accum_dtype, or use ZeRO stage 2"
        )
    raise ValueError(f"muon_megatron's DeepSpeed Muon does not support the optimizer wrapper {name}")


def check_model(model: torch.nn.Module) -> None:
    """Refuse a model whose parameters carry DeepSpeed's built-in Muon tag ``use_muon``: ZeRO-1/2
    would run the built-in Newton-Schulz on their gradients before ours."""
    tagged = [n for n, p in model.named_parameters() if getattr(p, "use_muon", None) is not None]
    if tagged:
        raise ValueError(
            f"parameters {tagged[:3]}... carry DeepSpeed's `use_muon` attribute (set when deepspeed.initialize "
            "ran with its built-in Muon on this model). DeepSpeed's ZeRO code would apply its own Muon to them "
            "as well: build a fresh model, or `del param.use_muon` on every parameter first"
        )


def expert_group_name(param: torch.Tensor) -> Optional[str]:
    """DeepSpeed MoE expert parameters carry ``allreduce=False`` and ``group_name``."""
    if getattr(param, "allreduce", True) is False:
        return getattr(param, "group_name", None)
    return None


def guard_zero_checkpoint_loading(zero, optimizer: DeepSpeedMuon) -> None:
    """Check the optimizer state of a ZeRO-1/2 checkpoint before DeepSpeed reads it.

    DeepSpeed's loader compares its own flat-buffer bookkeeping before handing the saved state to
    :meth:`DeepSpeedMuon.load_state_dict`, so an AdamW checkpoint would otherwise fail with a
    message about "parameter-alignment layout". This wraps the loader of this one ZeRO optimizer
    instance so that such a checkpoint raises :class:`ForeignOptimizerStateError` (which says how to
    load the weights alone) first. Universal checkpoints (``checkpoint_folder``) pass through.
    """
    import deepspeed.comm as ds_dist

    original = zero.load_state_dict

    def load_state_dict(state_dict_list=None, load_optimizer_states=True, *args, **kwargs):
        if load_optimizer_states and state_dict_list:
            rank = ds_dist.get_rank(group=zero.dp_process_group)
            saved = state_dict_list[rank] if rank < len(state_dict_list) else state_dict_list[0]
            optimizer.check_state_dict(saved.get("base_optimizer_state") if isinstance(saved, dict) else saved)
        return original(state_dict_list, load_optimizer_states, *args, **kwargs)

    zero.load_state_dict = load_state_dict
