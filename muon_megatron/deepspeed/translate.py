"""DeepSpeed's optimizer wrappers, described in the distributed engine's terms.

The only module that reads DeepSpeed's internal attributes. For each param group of
:class:`.optimizer.DeepSpeedMuon` it answers: which local tensors the wrapper put into the group,
which pieces of which parameters each tensor holds (:class:`ParamLayout` plus a flat offset), and
over which process group the pieces are spread.

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and the BF16_Optimizer (bf16 with fp32 gradient
  accumulation at ZeRO-1): one flat fp32 partition per group. Its pieces come from the fragment
  map DeepSpeed keeps for universal checkpoints (``param._hp_mapping``: the parameter's flat
  element range ``lp_fragment_address`` and its place ``hp_fragment_address`` in the partition). A
  matrix straddling partition boundaries is simply held in pieces by several ranks; the
  distributed engine gathers it to one owner. Process group: the group's data-parallel group (for
  MoE expert groups, their expert-data-parallel group).
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): one flat fp32 partition per *sub-group*, each
  parameter's ZeRO-3 partition (a flat range of ``ds_shape``) at its offset in it; see
  :func:`zero3_partition_pieces`. Models built under ``deepspeed.zero.Init`` are routed by
  ``ds_shape`` (:func:`shape_view`); a universal checkpoint loads through
  :func:`install_zero3_universal_loading`.
- Optimizer offload (``offload_optimizer`` to the CPU, stages 1-3): the same partitions, in CPU
  memory; Newton-Schulz runs on the accelerator (``GroupPieces.ns_device``).
- ZeRO-0 without mixed precision (no wrapper): the model's own parameters, whole, replicated on
  every data-parallel rank; the engine still orthogonalises each matrix on one rank only and sends
  the result to the others.
- ZeRO-0 with fp16/bf16 (``FP16_UnfusedOptimizer``): one fp32 master copy per parameter, in order.
- Megatron-DeepSpeed tensor parallelism (an ``mpu`` given to ``deepspeed.initialize``, ZeRO 0-2):
  a parameter marked ``tensor_model_parallel`` with ``partition_dim`` 0 or 1 is this TP rank's
  slice of the full matrix (``ParamLayout.shard``); the process group then spans TP x DP (the
  whole world; pipeline parallelism is refused), so the full matrix is gathered for
  Newton-Schulz. Parameters replicated over TP are replicas; one of them is used.

Anything else (ZeRO-3 with tensor parallelism, MiCS, SuperOffload, AutoEP experts at ZeRO-3) is
refused with the setting to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..distributed import ParamLayout
from ..distributed.layout import tensor_parallel_full_shape, tensor_parallel_shard
from .optimizer import DeepSpeedMuon, GroupPieces

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in Megatron-DeepSpeed tensor parallelism (size 1: none)."""

    size: int = 1
    rank: int = 0

    @classmethod
    def from_mpu(cls, mpu) -> "TensorParallel":
        if mpu is None:
            return cls()
        from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank, bwc_tensor_model_parallel_world_size

        return cls(int(bwc_tensor_model_parallel_world_size(mpu)), int(bwc_tensor_model_parallel_rank(mpu)))

    @classmethod
    def from_engine(cls, engine) -> "TensorParallel":
        return cls.from_mpu(getattr(engine, "mpu", None))

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
        full = tensor_parallel_full_shape(shape, dim, self.size)
        return ParamLayout(name, full, split, tensor_parallel_shard(full, dim, self.size, self.rank), flat_range)


def data_parallel_group(engine):
    """The engine's data-parallel process group (with sequence parallelism, data x sequence)."""
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
        layouts, process_group = None, data_parallel_group(engine)
        if group["use_muon"]:
            split = group.get("split")
            layouts = tuple([(tp.layout(n, p, split), 0)] for n, p in zip(names, originals))
            process_group = _muon_group(tp, process_group, bool(group.get("moe")))
        out.append(GroupPieces(tuple(tensors), layouts, process_group))
    return out


def _ns_device(tensor: torch.Tensor) -> Optional[torch.device]:
    """Where Newton-Schulz runs for pieces held in ``tensor``: the accelerator when ``tensor`` was
    offloaded to the CPU and DeepSpeed's accelerator is not the CPU; else None (``tensor``'s device)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if tensor.device.type == "cpu" and accelerator.device_name() != "cpu":
        return torch.device(accelerator.current_device_name())
    return None


def flat_partition_pieces(lp_groups, flats, process_groups, optimizer: DeepSpeedMuon,
                          tp: TensorParallel = TensorParallel(), what: str = "ZeRO") -> list[GroupPieces]:
    """Describe one flat fp32 partition per param group whose parameters carry DeepSpeed's fragment
    map (ZeRO-1/2 and the BF16_Optimizer; see module doc). ``lp_groups[i]``: the model parameters
    of group i in flat order; ``flats[i]``: this rank's partition; ``process_groups[i]``: its DP group."""
    out = []
    for i, group in enumerate(optimizer.param_groups):
        flat = flats[i]
        name_of = {id(p): n for p, n in zip(optimizer.original_params(i), optimizer.names(i))}
        layouts = None
        if group["use_muon"]:
            pieces = []
            for p in lp_groups[i]:
                if id(p) not in name_of:
                    raise RuntimeError(f"{what} param group {i} holds a parameter DeepSpeedMuon did not give it")
                if not hasattr(p, "_hp_mapping"):
                    raise RuntimeError(
                        f"this DeepSpeed version keeps no fragment map (param._hp_mapping) for {what}; "
                        "muon_megatron needs DeepSpeed >= 0.10"
                    )
                mapping = p._hp_mapping
                if mapping is None:
                    continue  # no element of p in this rank's partition
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                layout = tp.layout(name_of[id(p)], p, group.get("split"), (lp.start, lp.start + lp.numel))
                pieces.append((layout, int(hp.start)))
            layouts = (tuple(pieces),)
            process_group = _muon_group(tp, process_groups[i], bool(group.get("moe")))
        else:
            process_group = process_groups[i]
        out.append(GroupPieces((flat,), layouts, process_group, ns_device=_ns_device(flat)))
    return out


def zero_partition_pieces(zero, optimizer: DeepSpeedMuon, tp: TensorParallel = TensorParallel()) -> list[GroupPieces]:
    """Describe the flat fp32 partitions of DeepSpeed's ZeRO-1/2 optimizer (see module doc)."""
    return flat_partition_pieces(zero.bit16_groups, zero.single_partition_of_fp32_groups, zero.real_dp_process_group,
                                 optimizer, tp, "ZeRO-1/2")


def zero3_partition_pieces(zero, optimizer: DeepSpeedMuon) -> list[GroupPieces]:
    """Describe the sub-groups of DeepSpeed's ZeRO-3 optimizer, one :class:`GroupPieces` each.

    Sub-group ``i`` belongs to param group ``zero.sub_group_to_group_id[i]``; its flat fp32
    partition ``zero.fp32_partitioned_groups_flat[i]`` is the concatenation, in the order of
    ``zero.fp16_groups[i]``, of each parameter's partition of ``p.partition_numel()`` elements: rank
    r of the partition group holds elements ``[r * n, (r + 1) * n)`` of the flattened parameter of
    ``p.ds_numel`` elements and shape ``p.ds_shape`` (the last ranks pad). Every rank holds a piece
    of nearly every matrix, so nearly every matrix is gathered to its owner for Newton-Schulz.
    """
    import torch.distributed as dist

    out = []
    for i, params in enumerate(zero.fp16_groups):
        gi = int(zero.sub_group_to_group_id[i])
        group, flat = optimizer.param_groups[gi], zero.fp32_partitioned_groups_flat[i]
        process_group = zero.sub_group_process_groups[i]
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        name_of = {id(p): n for p, n in zip(optimizer.original_params(gi), optimizer.names(gi))}
        pieces, offset = [], 0
        for p in params:
            if id(p) not in name_of:
                raise RuntimeError(f"ZeRO-3 sub-group {i} holds a parameter DeepSpeedMuon did not put in group {gi}")
            size, numel = int(p.partition_numel()), int(p.ds_numel)
            if size != -(-numel // world):
                raise RuntimeError(
                    f"ZeRO-3 partition of {name_of[id(p)]!r}: {size} elements per rank for {numel} over {world} ranks; "
                    "muon_megatron expects ceil(numel / ranks)"
                )
            if group["use_muon"]:
                if getattr(p, "ds_zero_placement_family", "replicated") != "replicated":
                    raise ValueError(
                        f"{name_of[id(p)]!r} is an AutoEP expert parameter under ZeRO-3, which muon_megatron's DeepSpeed "
                        "Muon does not support; use ZeRO stage 1 or 2 with deepspeed.moe.layer.MoE"
                    )
                start = min(rank * size, numel)
                stop = min(start + size, numel)
                if stop > start:
                    layout = ParamLayout(name_of[id(p)], tuple(p.ds_shape), group.get("split"), None, (start, stop))
                    pieces.append((layout, offset))
            offset += size
        if offset != flat.numel():
            raise RuntimeError(f"ZeRO-3 sub-group {i}: partitions of {offset} elements, flat partition {flat.numel()}")
        layouts = (tuple(pieces),) if group["use_muon"] else None
        out.append(GroupPieces((flat,), layouts, process_group, group=gi, ns_device=_ns_device(flat)))
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
        if wrapper.cpu_offload:
            stage += " offload"
        return zero_partition_pieces(wrapper, optimizer, TensorParallel.from_engine(engine)), stage
    if name == "DeepSpeedZeroOptimizer_Stage3":  # exactly: MiCS and SuperOffload subclass it and partition otherwise
        if TensorParallel.from_engine(engine).size > 1:
            raise ValueError(_ZERO3_TP_MESSAGE)
        return zero3_partition_pieces(wrapper, optimizer), "ZeRO-3 offload" if wrapper.offload_optimizer else "ZeRO-3"
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(wrapper, FP16_UnfusedOptimizer):
        tensors = [list(g) for g in wrapper.fp32_groups]
        return _whole_pieces(optimizer, engine, tensors, "ZeRO-0 (FP16_UnfusedOptimizer)"), "ZeRO-0 " + name
    if name == "BF16_Optimizer":
        pieces = flat_partition_pieces(wrapper.bf16_groups, wrapper.fp32_groups_flat_partition,
                                       wrapper.real_dp_process_group, optimizer, TensorParallel.from_engine(engine),
                                       "BF16_Optimizer")
        return pieces, "ZeRO-1 BF16_Optimizer"
    raise ValueError(
        f"muon_megatron's DeepSpeed Muon does not support the optimizer wrapper {name} (zero_optimization settings "
        "such as mics_shard_size or offload_optimizer.super_offload select it)"
    )


_ZERO3_TP_MESSAGE = (
    "zero_optimization.stage 3 with tensor parallelism (an mpu with tensor-model-parallel size > 1) is not supported "
    "by muon_megatron's DeepSpeed Muon: use ZeRO stage 1 or 2 with tensor parallelism, or ZeRO-3 without it"
)


def check_tensor_parallel_zero3(mpu, stage: int) -> None:
    """Refuse ZeRO-3 with a tensor-parallel ``mpu`` before DeepSpeed builds anything."""
    if stage == 3 and TensorParallel.from_mpu(mpu).size > 1:
        raise ValueError(_ZERO3_TP_MESSAGE)


def shape_view(model: torch.nn.Module) -> Optional[tuple[torch.nn.Module, dict]]:
    """The model as the routing rule should see it when ZeRO-3 partitioned its parameters.

    Under ``deepspeed.zero.Init`` (or after ZeRO-3 partitioned a model) every parameter holds a
    1-D placeholder and keeps its real shape in ``ds_shape``; routing by ``param.ndim`` would send
    every matrix to AdamW. Returns a stand-in module tree with the same names, an
    ``nn.Embedding`` wherever the model has one, and meta-device parameters of the real shapes
    (shared parameters and modules stay shared), with the map ``id(stand-in) -> model parameter``;
    None when no parameter carries ``ds_shape`` (route the model itself).
    """
    if not any(hasattr(p, "ds_shape") for p in model.parameters()):
        return None
    real: dict[int, torch.nn.Parameter] = {}
    stand_in_of: dict[int, torch.nn.Parameter] = {}
    modules: dict[int, torch.nn.Module] = {}

    def copy_module(module: torch.nn.Module) -> torch.nn.Module:
        if id(module) in modules:
            return modules[id(module)]
        if isinstance(module, torch.nn.Embedding):
            view = torch.nn.Embedding.__new__(torch.nn.Embedding)  # the type is what routing reads
            torch.nn.Module.__init__(view)
        else:
            view = torch.nn.Module()
        modules[id(module)] = view
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in stand_in_of:
                shape = tuple(getattr(p, "ds_shape", p.shape))
                stand_in = torch.nn.Parameter(torch.empty(shape, device="meta"), requires_grad=p.requires_grad)
                stand_in_of[id(p)], real[id(stand_in)] = stand_in, p
            view.register_parameter(name, stand_in_of[id(p)])
        for name, child in module.named_children():
            view.add_module(name, copy_module(child))
        return view

    return copy_module(model), real


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


def guard_zero_checkpoint_loading(zero, optimizer: DeepSpeedMuon, state_key: str = "base_optimizer_state") -> None:
    """Check the optimizer state of a ZeRO checkpoint before DeepSpeed reads it (``state_key``: where
    DeepSpeed keeps the client optimizer's state in a rank's file; ZeRO-3 calls it
    ``optimizer_state_dict``).

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
            optimizer.check_state_dict(saved.get(state_key) if isinstance(saved, dict) else saved)
        return original(state_dict_list, load_optimizer_states, *args, **kwargs)

    zero.load_state_dict = load_state_dict


def install_zero3_universal_loading(zero, optimizer: DeepSpeedMuon) -> None:
    """Make this ZeRO-3 optimizer load the optimizer state of a universal checkpoint written by
    :func:`muon_megatron.deepspeed.universal.convert_to_universal` (any earlier DP size).

    DeepSpeed's ZeRO-3 universal loader reads Adam's ``exp_avg`` / ``exp_avg_sq`` for every
    sub-group. This replaces it on this one optimizer instance: the weights (fp32 masters and the
    bit16 partitions) load through DeepSpeed's own module path; then, per sub-group, each state
    key the parameters' folders hold (``momentum_buffer`` for Muon, ``exp_avg``, ``exp_avg_sq``,
    ``step`` for AdamW) is cut to this rank's ZeRO-3 partition of each parameter and placed at its
    offset in the flat state tensor. Hyper-parameters come from the checkpoint's param groups.
    """
    import os

    from .optimizer import ForeignOptimizerStateError

    original = zero._load_universal_checkpoint

    def load_universal(checkpoint_folder, load_optimizer_states, load_from_fp32_weights):
        if not load_optimizer_states:
            return original(checkpoint_folder, load_optimizer_states, load_from_fp32_weights)
        folder = os.path.join(checkpoint_folder, "zero")
        common = torch.load(os.path.join(folder, "optimizer_state.pt"), map_location="cpu", weights_only=False)
        marker = common.get("muon_megatron")
        if marker is None:
            raise ForeignOptimizerStateError(
                f"{checkpoint_folder} was not converted by muon_megatron.deepspeed.universal; to start Muon from its "
                "weights, load it with load_optimizer_states=False"
            )
        optimizer.check_routing(marker["groups"])
        zero.load_module_checkpoint_state_from_checkpoint_dir_stage3(checkpoint_folder, load_from_fp32_weights)
        zero._load_global_state_stage3(common)
        for i, params in enumerate(zero.fp16_groups):
            flat = zero.fp32_partitioned_groups_flat[i]
            names = [zero.param_names[p] for p in params]
            key_sets = {n: {f[:-3] for f in os.listdir(os.path.join(folder, n)) if f.endswith(".pt")} - {"fp32"}
                        for n in names}
            keys = key_sets[names[0]]
            if any(k != keys for k in key_sets.values()):
                raise ValueError(f"{folder}: parameters of one ZeRO-3 sub-group hold different state keys {key_sets}")
            state = {}
            for key in sorted(keys):
                if key == "step":
                    state[key] = torch.load(os.path.join(folder, names[0], "step.pt"), weights_only=False)
                    continue
                values, offset = torch.zeros_like(flat), 0
                for p, n in zip(params, names):
                    part = zero.load_hp_checkpoint_state(os.path.join(folder, n), key, param=p)
                    values.narrow(0, offset, part.numel()).copy_(part)
                    offset += part.numel()
                state[key] = values
            optimizer.state.pop(flat, None)
            if state:
                optimizer.state[flat] = state
        optimizer.load_group_settings(common["param_groups"])

    zero._load_universal_checkpoint = load_universal
