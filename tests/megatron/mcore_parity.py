"""Workers for the parity tests: a single-process reference and parallel runs (tests only).

``reference_worker`` (world of 1, TP1): builds the tiny model, trains it ``steps`` steps on the
whole global batch with the foundation's ``muon_megatron.Muon`` (splits declared by hand here,
independently of the adapter) and saves the initial and final full weights.

``parallel_worker``: builds the same model under a parallel layout, loads the reference's initial
weights (each rank its shard), trains with ``muon_megatron.megatron.get_muon_optimizer`` through
Megatron's DDP and optimizer wrappers, and compares every local tensor with the matching shard of
the reference's final weights. Returns per-parameter relative errors (Frobenius).
"""

from __future__ import annotations

import re

import torch

import mcore_models as mm

LR, WD, CLIP = 0.02, 0.1, 1.0
BETAS, EPS = (0.9, 0.95), 1e-8


def _init_parallel(tp=1, pp=1, ep=1, etp=None):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def _strip(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def reference_splits(spec: mm.TinySpec, model) -> dict:
    from muon_megatron.core.splits import FusedQKV, GateUp

    cfg = model.config
    groups = cfg.num_query_groups or cfg.num_attention_heads
    splits = {"*linear_fc1.weight": GateUp()}
    if not spec.multi_latent_attention:
        splits["*linear_qkv.weight"] = FusedQKV(groups, cfg.num_attention_heads // groups, cfg.kv_channels)
    return splits


def references_worker(rank, world, jobs):
    """Several references in one process: ``jobs`` is a list of (spec, steps, path)."""
    from megatron.core import parallel_state as ps

    out = []
    for spec, steps, path in jobs:
        out.append(reference_worker(rank, world, spec, steps, path))
        ps.destroy_model_parallel()
    return out


def reference_worker(rank, world, spec, steps, path, ns_dtype="float32"):
    from muon_megatron import Muon
    from muon_megatron.core.routing import muon_param_groups

    _init_parallel()
    model = mm.build_gpt(spec)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = muon_param_groups(model, splits=reference_splits(spec, model))
    opt = Muon(groups, lr=LR, weight_decay=WD, adamw_betas=BETAS, adamw_eps=EPS, ns_dtype=ns_dtype)
    losses = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        loss = mm.loss_of(model, mm.batch(step, spec))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], CLIP)
        opt.step()
        losses.append(loss.item())
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"initial": initial, "final": final, "losses": losses}, path)
    return losses


def _global_name(name: str, model) -> str:
    """Reference (TP1, PP1) name of a local parameter: global layer numbers under PP."""
    from megatron.core import parallel_state as ps

    match = re.search(r"decoder\.layers\.(\d+)\.", name)
    if match and ps.get_pipeline_model_parallel_world_size() > 1:
        offset = _layer_offset(model)
        name = name.replace(f"decoder.layers.{match.group(1)}.", f"decoder.layers.{int(match.group(1)) + offset}.", 1)
    match = re.search(r"experts\.local_experts\.(\d+)\.", name)
    if match and ps.get_expert_model_parallel_world_size() > 1:
        local = int(match.group(1))
        per_rank = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        glob = ps.get_expert_model_parallel_rank() * per_rank + local
        name = name.replace(f"local_experts.{local}.", f"local_experts.{glob}.", 1)
    return name


def _layer_offset(model) -> int:
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def shard_of(full: torch.Tensor, param, name: str, model) -> torch.Tensor:
    """This rank's shard of a reference (full) tensor, Megatron's way (SwiGLU fc1 interleaved)."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    expert = not getattr(param, "allreduce", True)
    tp = ps.get_expert_tensor_parallel_world_size() if expert else ps.get_tensor_model_parallel_world_size()
    rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
    if tp == 1:
        return full
    dim = param.partition_dim
    if dim == 0 and name.endswith("linear_fc1.weight") and model.config.gated_linear_unit:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def parallel_worker(rank, world, spec, steps, ref_path, layout, settings_kwargs=None, bucket_size=1000,
                    start=0, save_dir=None, load_dir=None):
    """``layout``: dict with tp, pp, ep, etp, distopt. Trains steps ``start .. steps - 1``; with
    ``load_dir`` first loads a torch_dist checkpoint (model and optimizer), with ``save_dir`` saves
    one at the end. Returns (relative error per reference name after the last step, losses, and
    for the dense Muon plan the number of logical matrices and how many this rank orthogonalises)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    from muon_megatron.megatron import MuonSettings, get_muon_optimizer

    _init_parallel(layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1), layout.get("etp"))
    ref = torch.load(ref_path)
    pre = ps.is_pipeline_first_stage()
    post = ps.is_pipeline_last_stage()
    model = mm.build_gpt(spec, pre_process=pre, post_process=post)
    names = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            names[p] = _global_name(name, model)
            p.copy_(shard_of(ref["initial"][names[p]], p, names[p], model))
    distopt = layout.get("distopt", False)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distopt, grad_reduce_in_fp32=True, bucket_size=bucket_size
    )
    ddp_kwargs = {}
    if layout.get("aligned"):
        from muon_megatron.megatron.aligned import aligned_param_layout

        ddp_kwargs["full_param_layout"] = aligned_param_layout(
            [p for p in model.parameters() if p.requires_grad], bucket_size,
            ps.get_data_parallel_world_size(with_context_parallel=True), ddp_config,
        )
    ddp = DDP(model.config, ddp_config, model, **ddp_kwargs)
    config = OptimizerConfig(
        optimizer="muon", lr=LR, min_lr=0.0, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_eps=EPS, clip_grad=CLIP, use_distributed_optimizer=distopt, bf16=False, fp16=False,
    )
    settings = MuonSettings(**dict(dict(ns_dtype="float32"), **(settings_kwargs or {})))
    opt = get_muon_optimizer(config, [ddp], settings)
    if load_dir:
        _load(model, opt, load_dir)
    losses = []
    for step in range(start, steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens = mm.local_batch(mm.batch(step, spec), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        loss = _forward_backward(ddp, model, tokens, spec)
        finalize_model_grads([ddp])  # DP reduction, plus sequence-parallel norm grads over TP
        ok, _, _ = opt.step()
        assert ok, "optimizer step reported failure"
        losses.append(loss)
    if save_dir:
        _save(model, opt, save_dir)
    errors = {}
    for p, gname in names.items():
        expected = shard_of(ref["final"][gname], p, gname, model)
        errors[gname] = float((p.detach() - expected).norm() / expected.norm().clamp_min(1e-12))
    inner = opt.chained_optimizers[0].optimizer
    plan = {
        "matrices": len(inner.plan.matrices),
        "owned": len(inner.plan.owned(inner.rank)),
        "gather_elems": inner.plan.gather_elems[inner.rank],
        "sources": [len(m.sources) for m in inner.plan.matrices],
    }
    return errors, losses, plan


def _forward_backward(ddp, model, tokens, spec):
    """One forward/backward of the local batch; through the pipeline schedule when PP > 1."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        loss = mm.loss_of(ddp, tokens)
        loss.backward()
        return loss.item()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, m):
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        position_ids = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
        out = m(inputs, position_ids, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    result = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[ddp],
        num_microbatches=1,
        seq_length=spec.seq_length,
        micro_batch_size=tokens.shape[0],
        forward_only=False,
    )
    return float(result[0]["loss"]) if result else float("nan")


def _save(model, opt, directory):
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    state = {"model": model.sharded_state_dict()}
    state["optimizer"] = opt.sharded_state_dict(state["model"], is_loading=False)
    dist_checkpointing.save(state, directory)


def _load(model, opt, directory):
    from megatron.core import dist_checkpointing

    state = {"model": model.sharded_state_dict()}
    state["optimizer"] = opt.sharded_state_dict(state["model"], is_loading=True)
    loaded = dist_checkpointing.load(state, directory)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
