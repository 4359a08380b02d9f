"""Build Moonlight's Muon as a megatron-core optimizer: :func:`get_muon_optimizer`.

Megatron keeps everything it already does well: gradient reduce-scatter / all-reduce through its
DDP buffers, loss scaling and ``found_inf``, gradient clipping (on the gradient, before momentum
and Newton-Schulz), fp32 main params for bf16/fp16 models, the param all-gather (with overlap),
and checkpoints. We only replace the *inner* torch optimizer of its wrappers
(``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params``, ``FP32Optimizer``) with
:class:`muon_megatron.distributed.DistributedMuon` (as :class:`.inner.MegatronMuon`), whose Muon groups say, through
``ParamLayout`` s, which piece of which full matrix each main-param tensor is:

- with the distributed optimizer, the flat range of the (tensor-parallel) parameter that this DP
  rank owns in Megatron's bucketed buffer;
- without it, the whole tensor-parallel shard, replicated over DP (the planner then spreads the
  Newton-Schulz work over the DP ranks: each matrix once).

The wrapper is first built around a plain ``torch.optim.AdamW`` over the same param groups (the
one inner optimizer every supported release accepts; it allocates no state), then its main-param
groups are handed to ``DistributedMuon`` which replaces it. Dense and expert-parallel parameters
get separate wrappers (as in megatron-core), chained.

Muon pieces are matched across the tensor x data (x context) parallel ranks of one pipeline stage
for dense parameters, and across the expert-tensor x expert-data parallel ranks for experts.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..distributed.comm import any_rank
from ..kernels.orthogonalize import orthogonalizer
from .checkpoint import muon_distributed_optimizer_class, muon_wrapper_class
from .config import MuonSettings
from .inner import MegatronMuon
from .params import MegatronParam, describe_parameters
from .qk_clip import build_qk_clip
from .state import init_muon_state

logger = logging.getLogger(__name__)

_CARRIER_KEYS = ("betas", "eps", "amsgrad", "foreach", "maximize", "capturable", "differentiable", "fused",
                 "decoupled_weight_decay")


def _check_supported(config, model_chunks) -> None:
    problems = []
    if getattr(config, "optimizer_cpu_offload", False):
        problems.append("--optimizer-cpu-offload (drop it)")
    if getattr(config, "use_precision_aware_optimizer", False):
        problems.append("--use-precision-aware-optimizer (drop it; main params stay fp32)")
    if getattr(config, "overlap_param_gather_with_optimizer_step", False):
        problems.append("--overlap-param-gather-with-optimizer-step (use --overlap-param-gather)")
    ddp_config = getattr(model_chunks[0], "ddp_config", None)
    if ddp_config is None:
        problems.append("model chunks not wrapped in megatron.core.distributed.DistributedDataParallel")
    else:
        if getattr(ddp_config, "use_megatron_fsdp", False):
            problems.append("--use-megatron-fsdp (use --use-distributed-optimizer)")
        if getattr(ddp_config, "num_distributed_optimizer_instances", 1) != 1:
            problems.append("--num-distributed-optimizer-instances > 1")
        if bool(ddp_config.use_distributed_optimizer) != bool(config.use_distributed_optimizer):
            problems.append(
                "OptimizerConfig.use_distributed_optimizer and DistributedDataParallelConfig."
                "use_distributed_optimizer differ (set both)"
            )
    if problems:
        raise ValueError("muon-megatron does not support: " + "; ".join(problems))


def _param_groups(config, described: Sequence[MegatronParam], is_expert: bool) -> list[dict]:
    """One Muon and one AdamW group (always both, so every rank has the same groups), with the
    keys Megatron's scheduler and checkpoints read. Weight decay applies to every parameter, as in
    Moonlight (its appendix: decay on the norm gains mattered at scale)."""
    groups = []
    for use_muon in (True, False):
        members = [d for d in described if d.is_expert == is_expert and d.use_muon == use_muon]
        groups.append(
            {
                "params": [d.param for d in members],
                "names": [d.name for d in members],
                "use_muon": use_muon,
                "optimizer": "muon" if use_muon else "adam",
                "is_expert_parallel": is_expert,
                "wd_mult": 1.0,
                "lr_mult": 1.0,
                "is_decoupled_lr": False,
                "default_config": True,
                "max_lr": config.lr,
                "min_lr": config.min_lr,
            }
        )
    return groups


def _grad_scaler(config):
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(
            initial_scale=config.initial_loss_scale,
            min_scale=config.min_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=config.loss_scale_window,
            hysteresis=config.hysteresis,
        )
    return None


def _wrap(config, model_chunks, groups, buffers, pgs, model_parallel_group, dp_group, dp_group_gloo, dp_idx):
    """Megatron's wrapper around a carrier AdamW (no state is allocated by it)."""
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    carrier = torch.optim.AdamW(
        groups, lr=config.lr, weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
    )
    if config.fp16 or config.bf16 or config.use_distributed_optimizer:
        args = [carrier, config, _grad_scaler(config), init_muon_state]
        if config.use_distributed_optimizer:
            wrapper = muon_distributed_optimizer_class()(
                *args,
                model_chunks=model_chunks,
                per_model_buffers=buffers,
                data_parallel_group=dp_group,
                data_parallel_group_gloo=dp_group_gloo,
                data_parallel_group_idx=dp_idx,
                distributed_optimizer_instance_id=0,
            )
            wrapper.grad_stats_parallel_group = pgs["intra_dist_opt_group"]
        else:
            wrapper = muon_wrapper_class(Float16OptimizerWithFloat16Params)(*args)
            wrapper.grad_stats_parallel_group = model_parallel_group
    else:
        wrapper = muon_wrapper_class(FP32Optimizer)(carrier, config, init_muon_state)
        wrapper.grad_stats_parallel_group = model_parallel_group
    return wrapper


def _local_tensors(wrapper, group_index: int, group: dict, original: list) -> list[tuple[torch.Tensor, torch.nn.Parameter]]:
    """(main tensor, model param) pairs of one inner group, in the group's order."""
    from megatron.core.optimizer import DistributedOptimizer

    if isinstance(wrapper, DistributedOptimizer):
        models = wrapper.model_fp32_groups[group_index] + wrapper.model_float16_groups[group_index]
    else:
        models = original  # Float16 / FP32 wrappers replace main params in place, keeping the order
    if len(models) != len(group["params"]):
        raise RuntimeError(
            f"megatron-core's optimizer wrapper reordered param group {group_index} in an unexpected way "
            f"({len(models)} model params, {len(group['params'])} main params); this release is not supported"
        )
    return list(zip(group["params"], models))


def _muon_inner(wrapper, config, settings, described, originals, process_group, qk_clip=None):
    from megatron.core.optimizer import DistributedOptimizer

    by_param = {id(d.param): d for d in described}
    distributed = isinstance(wrapper, DistributedOptimizer)
    groups = []
    for gi, group in enumerate(wrapper.optimizer.param_groups):
        new = {k: v for k, v in group.items() if k not in _CARRIER_KEYS}
        pairs = _local_tensors(wrapper, gi, group, originals[gi])
        # Megatron's fp32 main shards are views of the model params (non-leaf tensors), which
        # torch.optim refuses; build on detached aliases (same storage), then put the real tensors
        # back: Megatron assigns .grad to those objects.
        new["params"] = [main.detach() for main, _ in pairs]
        new["names"] = [by_param[id(model)].name for _, model in pairs]
        if group["use_muon"]:
            layouts = []
            for main, model in pairs:
                flat = None
                if distributed:
                    rng = wrapper._get_model_param_range_map(model)["param"]
                    flat = (rng.start, rng.end)
                layouts.append([(by_param[id(model)].layout(flat), 0)])
            new["layouts"] = layouts
        groups.append(new)
    inner = MegatronMuon(
        groups,
        lr=config.lr,
        weight_decay=config.weight_decay,
        adamw_betas=(config.adam_beta1, config.adam_beta2),
        adamw_eps=config.adam_eps,
        process_group=process_group,
        report_update_rms=settings.log_update_rms,
        orthogonalize=orthogonalizer(settings.ns_backend),
        pipeline_exchange=settings.pipeline_exchange,
        **settings.optimizer_kwargs(),
    )
    wrapper.muon_routes = {d.param: d.use_muon for d in described}
    for group, real in zip(inner.param_groups, wrapper.optimizer.param_groups):
        group["params"] = list(real["params"])
    wrapper.optimizer = inner
    wrapper.init_state_fn = init_muon_state
    if qk_clip is not None:
        entries = []
        for gi, group in enumerate(inner.param_groups):
            for main, model in _local_tensors(wrapper, gi, group, originals[gi]):
                start = wrapper._get_model_param_range_map(model)["param"].start if distributed else None
                entries.append((model, main, start))
        qk_clip.bind_main_params(entries, sharded=distributed)
        inner.qk_clip = qk_clip
    return wrapper


_EXPERT_GROUPS: dict = {}


def _expert_muon_group():
    """The ranks that can hold pieces of one expert matrix: same pipeline stage and same
    expert-parallel rank (expert-tensor x expert-data parallel). Created once, collectively."""
    from megatron.core import parallel_state as ps

    world = torch.distributed.get_world_size()
    mine = (ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank())
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    cache_key = tuple(everyone)
    if cache_key in _EXPERT_GROUPS:
        return _EXPERT_GROUPS[cache_key]
    classes: dict = {}
    for rank, key in enumerate(everyone):
        classes.setdefault(key, []).append(rank)
    group = None
    for key in sorted(classes):
        g = torch.distributed.new_group(classes[key])
        if key == mine:
            group = g
    _EXPERT_GROUPS[cache_key] = group
    return group


def get_muon_optimizer(
    config,
    model_chunks: Sequence[torch.nn.Module],
    settings: Optional[MuonSettings] = None,
    *,
    use_gloo_process_groups: bool = True,
):
    """Moonlight's Muon for megatron-core: a ``MegatronOptimizer`` (a ``ChainedOptimizer`` of the
    dense and, if any, expert-parallel parts), used exactly like ``get_megatron_optimizer``'s.

    ``config`` is megatron-core's ``OptimizerConfig`` (lr, min_lr, weight_decay, adam_beta1/2 and
    adam_eps for the AdamW parameters, clip_grad, fp16/bf16, use_distributed_optimizer, ...);
    ``config.optimizer`` is ignored. ``model_chunks`` are the DDP-wrapped model chunks of this
    rank. ``settings``: Muon's own settings (default: Moonlight's).

    Promise: the parameters after each step equal, within float rounding, those
    :class:`muon_megatron.Muon` computes in one process on the unsharded model with the same
    gradients, under any TP / DP / PP / EP layout, with or without the distributed optimizer.
    With ``settings.qk_clip_threshold`` set, QK-Clip follows each step (see :mod:`.qk_clip`;
    forward hooks on the attention modules measure the max logits, and a model whose attention
    cannot report them is refused here, naming the module).
    Collective: every rank must call it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    from .version import check_megatron_version

    check_megatron_version()
    settings = settings or MuonSettings()
    model_chunks = list(model_chunks)
    _check_supported(config, model_chunks)
    described = describe_parameters(model_chunks, settings)
    qk_clip = build_qk_clip(model_chunks, settings)  # None unless settings.qk_clip_threshold is set
    pgs = ProcessGroupCollection.setup_process_groups_for_optimizer(None, model_chunks, use_gloo_process_groups)
    optimizers = []

    dense_groups = _param_groups(config, described, is_expert=False)
    dense_buffers = {i: c.buffers for i, c in enumerate(model_chunks) if hasattr(c, "buffers")}
    originals = [list(g["params"]) for g in dense_groups]
    wrapper = _wrap(
        config, model_chunks, dense_groups, dense_buffers, pgs, pgs["mp_group"], pgs["intra_dp_cp_group"],
        pgs["intra_dp_cp_group_gloo"], pgs["mp_group"].rank(),
    )
    optimizers.append(
        _muon_inner(wrapper, config, settings, described, originals,
                    ps.get_tensor_and_data_parallel_group(with_context_parallel=True), qk_clip)
    )

    if _any_rank_has_experts(described):  # collective: every rank takes the same branch
        expert_groups = _param_groups(config, described, is_expert=True)
        expert_buffers = {
            i: c.expert_parallel_buffers for i, c in enumerate(model_chunks) if hasattr(c, "expert_parallel_buffers")
        }
        originals = [list(g["params"]) for g in expert_groups]
        wrapper = _wrap(
            config, model_chunks, expert_groups, expert_buffers, pgs, pgs["expt_tp_pp_group"],
            pgs["intra_expt_dp_group"], pgs["intra_expt_dp_group_gloo"] if use_gloo_process_groups else None,
            pgs["expt_tp_pp_group"].rank(),
        )
        optimizers.append(_muon_inner(wrapper, config, settings, described, originals, _expert_muon_group()))

    for opt in optimizers:
        opt.tp_group = ps.get_tensor_model_parallel_group()
    logger.info(
        "muon-megatron: %d Muon and %d AdamW parameters on this rank (%s)",
        sum(d.use_muon for d in described), sum(not d.use_muon for d in described),
        "distributed optimizer" if config.use_distributed_optimizer else "replicated optimizer state",
    )
    return ChainedOptimizer(optimizers)


def _any_rank_has_experts(described) -> bool:
    return any_rank(any(d.is_expert for d in described))
