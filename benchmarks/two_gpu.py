"""Side by side on two GPUs: this project's Muon against megatron-core's own Muon, DeepSpeed's
built-in Muon and AdamW, per parallel layout (issue 14, item 2).

    python benchmarks/two_gpu.py --out DIR                       # 2 GPUs (one rank per GPU, NCCL)
    python benchmarks/two_gpu.py --tiny --out DIR                # CPU dry run: gloo, toy sizes

Layouts (``--layouts``; default all) and the optimizers each runs (``--optimizers`` picks families):

| layout | ranks | Megatron layout | adam | ours | mcore (megatron-core 0.19 + Emerging-Optimizers 0.2.0) |
| --- | --- | --- | --- | --- | --- |
| 1gpu | 1 | - | Adam | ours | Muon |
| dp2 | 2 | DP 2, replicated optimizer | Adam | ours (each matrix on one rank) | duplicated (every rank every matrix); layer-wise (legacy path: gradient all-reduce, parameter all-gather) |
| dp2-distopt | 2 | DP 2, distributed optimizer | distributed Adam | ours (gather); ours (aligned layout) | layer-wise over its shard-aligned DDP layout (what ``--use-distributed-optimizer`` builds in 0.19.2) |
| tp2 | 2 | TP 2 | Adam | ours | TP modes blockwise, duplicated, distributed |
| ep2 | 2 | Moonlight-mini-gpu (MoE, MLA): DP 2, EP 2 | Adam | ours | duplicated; layer-wise (legacy path) |
| ds-zero1 | 2 | DeepSpeed ZeRO-1, DP 2 (``deepspeed_vs_builtin.py``) | AdamW | ours (``ns_backend: auto``) | - (``deepspeed``: DeepSpeed's built-in Muon) |

The Megatron layouts use the dense GPT of shared/MOONLIGHT.md ("Measured side by side"): 12 layers,
hidden 2048, SwiGLU FFN 5632, 16 heads, vocabulary 32768 (untied), megatron-core's local layer
spec, bf16 with fp32 main params, micro-batch 4 x 2048 tokens per DP rank; ``ep2`` uses
Moonlight-mini-gpu (``muon_megatron.models``) at 4 x 1024 tokens per rank. lr 4.2e-4, weight decay
0.1, gradient clipping 1.0, Adam betas (0.9, 0.95). megatron-core's Muon gets Moonlight's settings
as far as its flags reach: ``--muon-scale-mode spectral`` (sqrt(max(A, B))) with
``--muon-extra-scale-factor 0.2``, ``--muon-coefficient-type simple`` (Moonlight's coefficients),
Nesterov on, momentum 0.95, 5 steps, bf16 Newton-Schulz (``fp32_matmul_prec medium``), QKV split on;
it orthogonalises a fused SwiGLU fc1 as one matrix (Moonlight and ours: gate and up apart).

With two ranks, DDP overlaps the gradient reduction with backward in megatron-core's default
buckets (4e7 elements; the distributed optimizer shards each bucket over DP, which is where a
matrix straddles two ranks). Each layout runs in one spawned world, its runs one after another
(model, DDP and optimizer built anew for each); a run that raises is recorded and the next one
goes on, and when a world dies a new one takes the runs not yet started. Per run, measured:

- median iteration time (zero-grad, forward, backward, gradient reduction, optimizer step) and
  median optimizer-step time (``optimizer.step()``), CUDA events, max over ranks, over ``--iters``
  iterations after 3 warm-up iterations;
- peak GPU memory (``torch.cuda.max_memory_allocated``, max over ranks) over those iterations;
- bytes each rank sends in collectives during ``optimizer.step()`` (counted by wrapping
  ``torch.distributed``; ring-algorithm counts, see ``worlds.CollectiveBytes``), and for ours the
  plan's Muon exchange (``DistributedMuon.plan.send_bytes``), max over ranks;
- the first step's update against the float64 full-matrix Moonlight update on layer 0's fc1
  (column-parallel under TP) and fc2 (row-parallel), on a matrix that straddles a partition of
  megatron-core's distributed-optimizer layout (``dp2-distopt``), and on one routed expert
  (``ep2``). The reference gathers the full-batch gradient the optimizer receives (Megatron's
  DP-reduced main_grads; under the distributed optimizer each rank's reduced shard, summed over
  DP; concatenated over TP) on rank 0 and applies
  ``0.2 sqrt(max(A, B)) NS5(g)`` in float64 with Moonlight's coefficients, per logical matrix
  (q/k/v, gate/up apart; "whole" = the fused tensor as one matrix); at step 1 the momentum is a
  multiple of g and Newton-Schulz removes scalars. The update is read from the bf16 weights of a
  step taken at lr 1 (``(W0 (1 - lr wd) - W1) / lr``; bf16 rounding of W1 leaves about 1e-3),
  after which the weights are restored and the run goes on at lr 4.2e-4.

Writes DIR/results.json and DIR/results.md; prints the tables last. Needs megatron-core (0.19.2
measured); megatron-core's Muon needs ``emerging_optimizers`` 0.2.0 (not on PyPI, never required
by the package): without it those rows say "not installed". ``--tiny`` runs every layout on the
CPU with gloo at toy sizes, megatron-core's CUDA assumptions redirected by
``tests/megatron/cpu_shim.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from worlds import CollectiveBytes, StepTimer, init_process_group, log, median, run_world, set_process_env  # noqa: E402

LR, MIN_LR, WD, CLIP = 4.2e-4, 4.2e-5, 0.1, 1.0
BETAS, EPS = (0.9, 0.95), 1e-8
MEASURE_LR = 1.0  # the update dominates the bf16 weights it is added to (see the docstring)
SEED = 1234
COLLECTIVE_TIMEOUT_S = 120  # a rank left waiting in a collective by a failed peer errors out after this


@dataclass(frozen=True)
class Layout:
    name: str
    world: int
    tp: int = 1
    ep: int = 1
    distopt: bool = False
    moe: bool = False
    what: str = ""


LAYOUTS = {
    "1gpu": Layout("1gpu", 1, what="1 GPU"),
    "dp2": Layout("dp2", 2, what="DP 2"),
    "dp2-distopt": Layout("dp2-distopt", 2, distopt=True, what="DP 2, distributed optimizer"),
    "tp2": Layout("tp2", 2, tp=2, what="TP 2"),
    "ep2": Layout("ep2", 2, ep=2, moe=True, what="Moonlight-mini-gpu, DP 2 + EP 2"),
    "ds-zero1": Layout("ds-zero1", 2, what="DeepSpeed ZeRO-1, DP 2"),
}
FAMILIES = ("adam", "ours", "mcore", "deepspeed")

# megatron-core's Muon modes per layout ("mcore" alone: one GPU, where the TP mode does nothing).
MCORE_VARIANTS = {
    "1gpu": ("mcore",),
    "dp2": ("mcore-duplicated", "mcore-layerwise"),
    "dp2-distopt": ("mcore-layerwise",),
    "tp2": ("mcore-blockwise", "mcore-duplicated", "mcore-distributed"),
    "ep2": ("mcore-duplicated", "mcore-layerwise"),
}

DENSE = dict(num_layers=12, hidden=2048, ffn=5632, heads=16, vocab=32768, seq=2048, micro_batch=4)
# Three layers: with two, megatron-core's one-bucket layout puts the DP boundary between two matrices.
TINY_DENSE = dict(num_layers=3, hidden=64, ffn=176, heads=4, vocab=256, seq=32, micro_batch=2)
# DDP buckets with more than one rank: overlap_grad_reduce on, megatron-core's default bucket size
# (max(4e7, 1e6 * dp) elements); the distributed optimizer shards each bucket over DP.
BUCKET, TINY_BUCKET = 40_000_000, 40_000


def describe_variant(layout: Layout, variant: str) -> str:
    if variant == "adam":
        return "Adam (megatron-core" + (", distributed optimizer)" if layout.distopt else ")")
    if variant == "ours":
        return "ours" + (" (gather layout)" if layout.distopt else "")
    if variant == "ours-aligned":
        return "ours (aligned layout)"
    if variant == "ours-pipelined":
        return "ours, exchange pipelined chunk by chunk (--muon-pipeline-exchange)"
    if variant == "mcore":
        return "megatron-core Muon"
    mode = variant.split("-", 1)[1]
    if mode == "layerwise":
        return "megatron-core Muon, layer-wise" + (" (shard-aligned DDP layout)" if layout.distopt else " (legacy path)")
    if mode == "duplicated" and layout.tp == 1:
        return "megatron-core Muon, duplicated (every rank every matrix)"
    return f"megatron-core Muon, TP mode {mode}"


def megatron_variants(layout: Layout, families) -> list[str]:
    out = []
    if "adam" in families:
        out.append("adam")
    if "ours" in families:
        out += ["ours"] + (["ours-aligned"] if layout.distopt else []) + (["ours-pipelined"] if layout.world > 1 else [])
    if "mcore" in families:
        out += list(MCORE_VARIANTS[layout.name])
    return out


# ---------------------------------------------------------------------------------------------
# One Megatron run (inside a spawned rank)


def megatron_worker(rank: int, world: int, jobs: list, outdir: str) -> None:
    """One layout's runs, one after the other, in this world. Per run, rank 0 writes
    ``<id>.started`` before and ``<id>.json`` after; a run that raises writes ``<id>.error.<rank>``
    and the next run goes on (a rank stuck in a collective ends the world after the collective
    timeout; the parent then starts a new world for the runs not yet started)."""
    import gc
    import warnings

    import torch

    counter = CollectiveBytes().install()  # before megatron-core binds collectives at import
    cuda = not jobs[0]["tiny"]
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not cuda:
        warnings.filterwarnings("ignore")
        torch.set_num_threads(1)
        sys.path.insert(0, os.path.join(ROOT, "tests", "megatron"))
        import cpu_shim

        cpu_shim.activate()
    init_process_group(rank, world, cuda, timeout_s=COLLECTIVE_TIMEOUT_S)
    from megatron.core import parallel_state as ps

    layout = LAYOUTS[jobs[0]["layout"]]
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, expert_model_parallel_size=layout.ep)
    try:
        for job in jobs:
            if rank == 0:
                open(os.path.join(outdir, f"{job['id']}.started"), "w").close()
                log(f"[{job['id']}] {describe_variant(layout, job['variant'])} on {world} rank(s), {job['model']}")
            try:
                result = _megatron_run(rank, world, job, counter, cuda)
                if rank == 0:
                    with open(os.path.join(outdir, f"{job['id']}.json"), "w") as f:
                        json.dump(result, f)
            except Exception:  # noqa: BLE001 - recorded; the next run goes on
                import traceback

                with open(os.path.join(outdir, f"{job['id']}.error.{rank}"), "w") as f:
                    f.write(traceback.format_exc())
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            torch.distributed.barrier()
    finally:
        _teardown()


def _teardown() -> None:
    import torch

    try:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - cleanup only
        pass
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _build_model(job: dict, layout: Layout, cuda: bool):
    """The GPTModel of this run (bf16 params) and its (micro-batch, sequence, vocabulary)."""
    import torch

    if job["model"] == "moonlight-mini-gpu":
        from muon_megatron.models import get_model
        from muon_megatron.models.megatron_config import build_gpt_model

        spec = get_model("moonlight-mini" if job["tiny"] else "moonlight-mini-gpu")
        model = build_gpt_model(
            spec, bf16=True, params_dtype=torch.bfloat16, use_cpu_initialization=not cuda,
            tensor_model_parallel_size=layout.tp, expert_model_parallel_size=layout.ep,
            sequence_parallel=layout.tp > 1,
        )
        seq = 32 if job["tiny"] else spec.seq_length
        return model, (2 if job["tiny"] else 4, seq, spec.vocab_size)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    d = TINY_DENSE if job["tiny"] else DENSE
    config = TransformerConfig(
        num_layers=d["num_layers"], hidden_size=d["hidden"], ffn_hidden_size=d["ffn"], num_attention_heads=d["heads"],
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, bias_activation_fusion=False,
        add_bias_linear=False, normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0, bf16=True,
        params_dtype=torch.bfloat16, use_cpu_initialization=not cuda, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, tensor_model_parallel_size=layout.tp,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=d["vocab"], max_sequence_length=d["seq"], share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    return model, (d["micro_batch"], d["seq"], d["vocab"])


def _ddp_config(job: dict, layout: Layout, distopt: bool):
    from megatron.core.distributed import DistributedDataParallelConfig

    if layout.world == 1:
        return DistributedDataParallelConfig(use_distributed_optimizer=distopt, grad_reduce_in_fp32=True)
    return DistributedDataParallelConfig(use_distributed_optimizer=distopt, grad_reduce_in_fp32=True,
                                         overlap_grad_reduce=True,
                                         bucket_size=TINY_BUCKET if job["tiny"] else BUCKET)


def _straddler(model, described: dict, dp: int, ddp_config) -> str | None:
    """The first Muon matrix that megatron-core's distributed-optimizer layout cuts between two DP
    shards (``DistributedOptimizer.compute_full_param_layout``, as DDP builds it by default)."""
    from megatron.core.optimizer import DistributedOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): _strip(n) for n, p in model.named_parameters()}
    layout = DistributedOptimizer.compute_full_param_layout(params, ddp_config.bucket_size, dp, ddp_config)
    cut = []
    for per_buffer in layout.layouts.values():
        for p, (start, end, bucket) in per_buffer.param_index_map.items():
            lo, hi = per_buffer.bucket_indices[bucket]
            shard = (hi - lo) // (per_buffer.num_optimizer_shards or dp)
            name = names[id(p)]
            if (start - lo) // shard != (end - 1 - lo) // shard and described[name].use_muon:
                cut.append((start, name))
    return min(cut)[1] if cut else None


def _measured_names(model, layout: Layout, described: dict, job: dict) -> tuple[list[str], str | None]:
    names = [n for n in ("decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight")
             if n in described]
    if job["model"] == "moonlight-mini-gpu":
        expert = next((n for n in described if ".experts.local_experts.0.linear_fc1." in n), None)
        names += [expert] if expert else []
    straddler = None
    if layout.distopt:
        from megatron.core import parallel_state as ps

        straddler = _straddler(model, described, ps.get_data_parallel_world_size(), _ddp_config(job, layout, True))
        if straddler and straddler not in names:
            names.append(straddler)
    return names, straddler


def _build_optimizer(job: dict, layout: Layout, model):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    variant = job["variant"]
    params = [p for p in model.parameters() if p.requires_grad]
    dp = ps.get_data_parallel_world_size()
    edp = ps.get_expert_data_parallel_world_size()
    ddp_kwargs = {}
    if variant == "mcore-layerwise" and layout.distopt:
        # megatron-core 0.19.2's --use-distributed-optimizer with Muon: buffers tagged for the
        # layer-wise optimizer, each matrix whole in one DP shard (training.wrap_model_chunks_with_ddp).
        from megatron.core.optimizer.layer_wise_optimizer import (
            LayerWiseDistributedOptimizer,
            tag_params_for_buffer_routing,
        )

        tag_params_for_buffer_routing([model])
        ddp_config = _ddp_config(job, layout, True)
        ddp_kwargs["full_param_layout"] = LayerWiseDistributedOptimizer.compute_full_param_layout(
            params, ddp_config.bucket_size, dp, ddp_config, expert_data_parallel_world_size=edp)
    elif variant == "ours-aligned":
        from muon_megatron.megatron.aligned import aligned_param_layout

        ddp_config = _ddp_config(job, layout, True)
        ddp_kwargs["full_param_layout"] = aligned_param_layout(params, ddp_config.bucket_size, dp, ddp_config,
                                                               expert_data_parallel_world_size=edp)
    else:
        ddp_config = _ddp_config(job, layout, layout.distopt)
    ddp = DDP(model.config, ddp_config, model, **ddp_kwargs)
    common = dict(lr=LR, min_lr=MIN_LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS,
                  clip_grad=CLIP, bf16=True, fp16=False, params_dtype=torch.bfloat16)
    if variant == "adam":
        config = OptimizerConfig(optimizer="adam", use_distributed_optimizer=layout.distopt, **common)
        return ddp, get_megatron_optimizer(config, [ddp])
    if variant.startswith("ours"):
        from muon_megatron.megatron import MuonSettings, get_muon_optimizer

        config = OptimizerConfig(optimizer="adam", use_distributed_optimizer=layout.distopt, **common)
        extra = {"pipeline_exchange": True} if variant == "ours-pipelined" else {}  # (older trees lack the field)
        settings = MuonSettings(layout="aligned" if variant == "ours-aligned" else "gather", **extra)
        return ddp, get_muon_optimizer(config, [ddp], settings)
    mode = variant.split("-", 1)[1] if "-" in variant else "duplicated"
    config = OptimizerConfig(
        optimizer="muon", use_distributed_optimizer=False, use_layer_wise_distributed_optimizer=mode == "layerwise",
        muon_momentum=0.95, muon_nesterov=True, muon_scale_mode="spectral", muon_extra_scale_factor=0.2,
        muon_coefficient_type="simple", muon_num_ns_steps=5, muon_fp32_matmul_prec="medium",
        muon_tp_mode="duplicated" if mode == "layerwise" else mode, muon_split_qkv=True, **common,
    )
    return ddp, get_megatron_optimizer(config, [ddp])


def _loss(module, batch):
    import torch

    inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    position_ids = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
    return module(inputs, position_ids, None, labels=labels).float().mean()


def _gather_tp(t, param, group):
    import torch
    import torch.distributed as dist

    size = dist.get_world_size(group)
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def moonlight_reference(G, split):
    """``0.2 sqrt(max(A, B)) NS5(g)`` in float64 per logical matrix of ``split`` (Moonlight), and
    for the whole tensor as one matrix."""
    import torch

    from muon_megatron.core import newton_schulz, update_scale

    def one(M):
        return update_scale("moonlight", *M.shape) * newton_schulz(M, 5, "moonlight", torch.float64)

    per_matrix = torch.zeros_like(G)
    for mat in split.matrices(tuple(G.shape)):
        M = G.new_zeros(mat.shape)
        for b in mat.blocks:
            M[b.dst_row:b.dst_row + b.rows, b.dst_col:b.dst_col + b.cols] = G[b.src_row:b.src_row + b.rows,
                                                                               b.src_col:b.src_col + b.cols]
        O = one(M)
        for b in mat.blocks:
            per_matrix[b.src_row:b.src_row + b.rows, b.src_col:b.src_col + b.cols] = O[b.dst_row:b.dst_row + b.rows,
                                                                                       b.dst_col:b.dst_col + b.cols]
    return per_matrix, one(G)


def _relative(got, want) -> float:
    return float((got - want).norm() / want.norm())


def _reduced_gradient(ddp, param, group):
    """The DP-reduced gradient of ``param`` (this rank's TP shard), float64: ``main_grad`` as is
    after an all-reduce; under the distributed optimizer each rank holds the reduced values of its
    own shard of the bucket only, so the ranks' valid ranges are summed over ``group``."""
    import torch
    import torch.distributed as dist

    g = param.main_grad.detach().double().clone()
    full_layout = getattr(ddp, "full_param_layout", None)
    if not ddp.ddp_config.use_distributed_optimizer or full_layout is None:
        return g
    for per_buffer in full_layout.layouts.values():
        if param in per_buffer.param_index_map:
            start, end, bucket = per_buffer.param_index_map[param]
            lo, hi = per_buffer.bucket_indices[bucket]
            shard = (hi - lo) // (per_buffer.num_optimizer_shards or dist.get_world_size(group))
            me = dist.get_rank(group)
            a, b = max(start, lo + me * shard), min(end, lo + (me + 1) * shard)
            keep = torch.zeros(g.numel(), dtype=g.dtype, device=g.device)
            if b > a:
                keep[a - start:b - start] = 1
            g = (g.reshape(-1) * keep).view_as(g)
            dist.all_reduce(g, group=group)
            return g
    raise RuntimeError("parameter not found in the DDP layout")


def _measurement_step(ddp, model, opt, batch, names, described, rank):
    """Step 1 at lr MEASURE_LR: the update of each named matrix against the float64 reference;
    then the weights are restored (model and main params) and lr reset."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    named = {_strip(n): p for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    snapshot = [p.detach().clone() for p in trainable]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = _loss(ddp, batch)
    loss.backward()
    finalize_model_grads([ddp])
    grads = {}
    for n in names:
        expert = not getattr(named[n], "allreduce", True)
        grads[n] = _reduced_gradient(ddp, named[n],
                                     ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group())
    for group in opt.param_groups:
        group["lr"] = MEASURE_LR
    before = {n: named[n].detach().double().clone() for n in names}
    ok = opt.step()[0]
    after = {n: named[n].detach().double().clone() for n in names}
    with torch.no_grad():
        for p, saved in zip(trainable, snapshot):
            p.copy_(saved)
    opt.reload_model_params()
    for group in opt.param_groups:
        group["lr"] = LR
    del snapshot
    errors = {}
    for n in names:
        p = named[n]
        expert = not getattr(p, "allreduce", True)
        tp_group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
        g = grads[n]
        update = (before[n] * (1 - MEASURE_LR * WD) - after[n]) / MEASURE_LR
        G, U = _gather_tp(g, p, tp_group), _gather_tp(update, p, tp_group)
        if rank == 0:
            per_matrix, whole = moonlight_reference(G, described[n].split)
            errors[n] = {"shape": list(G.shape), "split": type(described[n].split).__name__,
                         "relative_error": _relative(U, per_matrix), "relative_error_whole": _relative(U, whole),
                         "scale_ratio": float(U.norm() / per_matrix.norm())}
    return bool(ok), float(loss.detach()), errors


def _plan_bytes(opt) -> tuple[int, int, int]:
    """(bytes this rank sends in the Muon exchange per step, matrices it orthogonalises, matrices
    in the plans) from the plans of ours' inner optimizers."""
    import torch

    sent = owned = total = 0
    for chained in getattr(opt, "chained_optimizers", [opt]):
        inner = getattr(chained, "optimizer", None)
        plan = getattr(inner, "plan", None)
        if plan is None:
            continue
        element = torch.empty((), dtype=inner.ns["ns_dtype"]).element_size()
        sent += plan.send_bytes(element)[inner.rank]
        owned += len(plan.owned(inner.rank))
        total += len(plan.matrices)
    return sent, owned, total


def _ours_newton_schulz(opt) -> tuple:
    """For ours: this rank's Newton-Schulz milliseconds in the last step (summed over the inner
    optimizers) and the Newton-Schulz backend chosen per bucket shape; (None, None) otherwise."""
    ms, backends = None, None
    for chained in getattr(opt, "chained_optimizers", [opt]):
        inner = getattr(chained, "optimizer", None)
        exchange = getattr(inner, "exchange", None)
        if exchange is None:
            continue
        ms = (ms or 0.0) + 1e3 * exchange.ns_seconds
        chooser = getattr(getattr(inner, "orthogonalize", None), "chooser", None)
        if chooser is not None:
            backends = dict(backends or {}, **chooser.table)
    return ms, backends


def _profile_step(ddp, opt, batch) -> list:
    """One more iteration with the optimizer step under torch.profiler: the 25 kernels (or CPU ops
    on the CPU) that took longest in it, with their total time and count."""
    import torch
    from megatron.core.distributed import finalize_model_grads

    ddp.zero_grad_buffer()
    opt.zero_grad()
    _loss(ddp, batch).backward()
    finalize_model_grads([ddp])
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = torch.cuda.is_available()
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        opt.step()
        if cuda:
            torch.cuda.synchronize()
    key = "device_time_total" if cuda else "cpu_time_total"
    rows = []
    for e in prof.key_averages():
        t = getattr(e, key, None)
        if t is None and cuda:
            t = getattr(e, "cuda_time_total", 0)
        rows.append({"name": e.key[:120], "ms": (t or 0) / 1e3, "count": e.count,
                     "cpu_ms": e.cpu_time_total / 1e3})
    if cuda:  # keep kernels: CPU-side ops carry their children's device time too
        rows = [r for r in rows if r["cpu_ms"] < 1e-3 or "::" not in r["name"]] or rows
    rows.sort(key=lambda r: -r["ms"])
    return rows[:25]


def _megatron_run(rank: int, world: int, job: dict, counter: CollectiveBytes, cuda: bool) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads

    from muon_megatron.megatron import MuonSettings, describe_parameters

    layout = LAYOUTS[job["layout"]]
    began = time.perf_counter()
    left_over = torch.cuda.memory_allocated() if cuda else 0  # from earlier runs in this world (should be ~0)
    counter.reset()
    torch.manual_seed(SEED)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model, (micro_batch, seq, vocab) = _build_model(job, layout, cuda)
    model = model.to(device)
    described = {d.name: d for d in describe_parameters([model], MuonSettings())}
    names, straddler = _measured_names(model, layout, described, job)
    if job["variant"] == "adam":
        names = []  # Adam's update is not Muon's: nothing to compare
    ddp, opt = _build_optimizer(job, layout, model)
    built = time.perf_counter() - began
    if rank == 0:
        log(f"  [{job['id']}] built in {built:.1f} s; measuring the update on {names}")
    dp_rank = ps.get_data_parallel_rank()
    batches = []
    for i in range(4):
        g = torch.Generator().manual_seed(1000 * i + dp_rank)
        batches.append(torch.randint(0, vocab, (micro_batch, seq + 1), generator=g).to(device))

    ok, first_loss, errors = _measurement_step(ddp, model, opt, batches[0], names, described, rank)
    if not ok:
        raise RuntimeError("the optimizer reported a failed step (non-finite gradients) on the measurement step")
    timer = StepTimer(cuda)
    marks, losses = [], []
    warmup, iters = job["warmup"], job["iters"]
    for i in range(warmup + iters):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            counter.reset()
        t0 = timer.mark()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = _loss(ddp, batches[(i + 1) % len(batches)])
        loss.backward()
        finalize_model_grads([ddp])
        t1 = timer.mark()
        counter.active = i >= warmup
        step_ok = opt.step()[0]
        counter.active = False
        t2 = timer.mark()
        marks.append((t0, t1, t2))
        losses.append(loss.detach())
        if not step_ok:
            raise RuntimeError(f"the optimizer reported a failed step at iteration {i}")
    if cuda:
        torch.cuda.synchronize()
    ns_ms, backends = _ours_newton_schulz(opt)
    profile = _profile_step(ddp, opt, batches[0]) if job.get("profile") and job["variant"].startswith("ours") else None
    times = torch.tensor([[timer.seconds(t0, t2), timer.seconds(t1, t2)] for t0, t1, t2 in marks[warmup:]],
                         dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # per iteration, the slowest rank
    sent, owned, matrices = _plan_bytes(opt)
    per_rank = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0, counter.total / iters, sent],
                            dtype=torch.float64, device=device)
    dist.all_reduce(per_rank, op=dist.ReduceOp.MAX)
    times, per_rank = times.cpu(), per_rank.cpu()
    return {
        "layout": layout.name, "variant": job["variant"], "model": job["model"], "world": world,
        "description": describe_variant(layout, job["variant"]), "status": "ok",
        "iteration_ms": 1e3 * median(times[:, 0].tolist()), "step_ms": 1e3 * median(times[:, 1].tolist()),
        "iteration_ms_all": (1e3 * times[:, 0]).tolist(), "step_ms_all": (1e3 * times[:, 1]).tolist(),
        "peak_gpu_bytes": int(per_rank[0]), "step_collective_bytes_per_rank": float(per_rank[1]),
        "step_collective_bytes_by_op_rank0": {k: v / iters for k, v in counter.by_op.items()},
        "muon_plan_bytes_per_rank": int(per_rank[2]) if matrices else None,
        "muon_matrices": matrices or None, "muon_matrices_owned_rank0": owned if matrices else None,
        "update_errors": errors, "straddling_matrix": straddler,
        "loss_first": first_loss, "loss_last": float(losses[-1]), "tokens_per_rank": micro_batch * seq,
        "build_s": built, "memory_left_by_earlier_runs_bytes": left_over, "run_s": time.perf_counter() - began,
        "ours_newton_schulz_ms_last_step_rank": ns_ms, "ours_backend_choices": backends, "ours_profile": profile,
    }


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1 through deepspeed_vs_builtin.py


DS_VARIANTS = {"adam": "adamw", "ours": "ours", "deepspeed": "builtin"}


def run_deepspeed(args, families, outdir) -> list[dict]:
    variants = [DS_VARIANTS[f] for f in families if f in DS_VARIANTS]
    if not variants:
        return []
    path = os.path.join(outdir, "deepspeed.json")
    # An odd number of identical blocks, so that the ZeRO-1 boundary cuts a matrix (with an even
    # number it falls between two blocks).
    sizes = (["--hidden", "64", "--layers", "3", "--vocab", "256", "--micro-batch", "2", "--seq", "32"] if args.tiny
             else ["--hidden", "2048", "--layers", "11", "--vocab", "32768", "--micro-batch", "4", "--seq", "2048"])
    cmd = [sys.executable, os.path.join(HERE, "deepspeed_vs_builtin.py"), "--device", "cpu" if args.tiny else "cuda",
           "--world", "2", "--stage", "1", *sizes, "--warmup", str(args.warmup), "--steps", str(args.iters),
           "--variants", *variants, "--json", path]
    env = dict(os.environ)
    if args.tiny:
        env["DS_ACCELERATOR"] = "cpu"
    log("[ds-zero1] " + " ".join(cmd[1:]))
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout * len(variants))
        failed = proc.returncode != 0
        message = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:]) if failed else ""
    except subprocess.TimeoutExpired:
        failed, message = True, f"timed out after {args.timeout * len(variants):.0f} s"
    wall = time.perf_counter() - began
    names = {"adamw": "adam", "ours": "ours", "builtin": "deepspeed"}
    if failed or not os.path.exists(path):
        log(f"[ds-zero1] FAILED ({wall:.0f} s):\n{message}")
        return [{"layout": "ds-zero1", "variant": names[v], "status": "failed", "error": message, "wall_s": wall}
                for v in variants]
    with open(path) as f:
        data = json.load(f)
    rows = []
    for r in data["rows"]:
        key = r.get("short")
        if key not in names:
            continue
        rows.append({
            "layout": "ds-zero1", "variant": names[key], "description": r["variant"], "status": "ok",
            "model": f"BenchModel hidden {data['args']['hidden']}, {data['args']['layers']} layers, fp32",
            "iteration_ms": 1e3 * r["iteration_median_s"], "step_ms": 1e3 * r["step_median_s"],
            "backward_ms": 1e3 * r["backward_median_s"], "peak_gpu_bytes": r["peak_gpu_bytes"],
            "muon_plan_bytes_per_rank": r.get("muon_send_bytes_max_rank"),
            "matrices_orthogonalised_per_step": r["ns_first_step"],
            "update_errors": ({data["straddling_matrix"]: {"relative_error": r["relative_error"],
                                                             "scale_ratio": r["scale_ratio"], "split": "Whole"}}
                              if "relative_error" in r else {}),
            "straddling_matrix": data["straddling_matrix"], "wall_s": wall / len(variants),
        })
    log(f"[ds-zero1] done in {wall:.0f} s")
    return rows


# ---------------------------------------------------------------------------------------------
# Tables


def _mib(b) -> str:
    return f"{b / 2**20:,.0f}" if b else "-"


def _mb(b) -> str:
    return "-" if b is None else f"{b / 1e6:,.1f}" if b >= 1e5 or b == 0 else f"{b / 1e6:.2g}"


def _error_cell(errors: dict) -> str:
    parts = []
    for name, e in errors.items():
        short = name.replace("decoder.layers.", "L").replace(".weight", "").replace("mlp.", "").replace(
            "self_attention.", "").replace("experts.local_experts.", "expert")
        cell = f"{short} {e['relative_error']:.1e}"
        if e.get("split") not in (None, "Whole") and "relative_error_whole" in e:
            cell += f" (whole {e['relative_error_whole']:.1e})"
        parts.append(cell)
    return "; ".join(parts) or "-"


def tables(rows: list[dict], meta: dict) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    adam = {r["layout"]: r for r in ok if r["variant"] == "adam"}
    lines = [f"## Side by side ({meta['where']})", "",
             "Median iteration / optimizer-step ms (overhead of the iteration over Adam's in the same layout).", "",
             "| layout | Adam | megatron-core Muon | DeepSpeed built-in | ours |", "| --- | --- | --- | --- | --- |"]
    for layout in meta["layouts"]:
        mine = [r for r in rows if r["layout"] == layout]
        if not mine:
            continue

        def cell(selected):
            out = []
            for r in selected:
                label = "" if r["variant"] in ("adam", "ours", "mcore", "deepspeed") else r["variant"].split("-", 1)[1] + " "
                if r["status"] != "ok":
                    out.append(f"{label}{r['status']}")
                    continue
                text = f"{label}{r['iteration_ms']:.0f} / {r['step_ms']:.0f}"
                base = adam.get(layout)
                if base and r["variant"] != "adam":
                    text += f" ({100 * (r['iteration_ms'] / base['iteration_ms'] - 1):+.1f} %)"
                out.append(text)
            return "; ".join(out) or "-"

        lines.append("| " + " | ".join([
            LAYOUTS[layout].what, cell([r for r in mine if r["variant"] == "adam"]),
            cell([r for r in mine if r["variant"].startswith("mcore")]),
            cell([r for r in mine if r["variant"] == "deepspeed"]),
            cell([r for r in mine if r["variant"].startswith("ours")]),
        ]) + " |")
    lines += ["", "Per run: peak GPU memory (max over ranks), bytes each rank sends per optimizer step (all "
              "collectives inside `optimizer.step()`, counted; ours' Muon exchange from its plan), and the first "
              "step's update against the float64 full-matrix Moonlight update (relative error; \"whole\": against "
              "the fused tensor orthogonalised as one matrix).", "",
              "| layout | optimizer | iteration ms | step ms | peak GPU MiB | collectives in step MB/rank | "
              "Muon exchange MB/rank (plan) | update error vs Moonlight | run s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['layout']} | {r['variant']} | {r['status']} | | | | | "
                         f"{(r.get('error') or '').splitlines()[-1][:120] if r.get('error') else ''} | "
                         f"{r.get('wall_s', 0):.0f} |")
            continue
        lines.append("| " + " | ".join([
            r["layout"], r.get("description", r["variant"]), f"{r['iteration_ms']:.1f}", f"{r['step_ms']:.1f}",
            _mib(r.get("peak_gpu_bytes")), _mb(r.get("step_collective_bytes_per_rank")),
            _mb(r.get("muon_plan_bytes_per_rank")), _error_cell(r.get("update_errors", {})),
            f"{r.get('run_s', r.get('wall_s', 0)):.0f}",
        ]) + " |")
    straddlers = {r["layout"]: r["straddling_matrix"] for r in ok if r.get("straddling_matrix")}
    if straddlers:
        lines += ["", "Matrices straddling a partition: " + "; ".join(f"{k}: `{v}`" for k, v in straddlers.items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--optimizers", nargs="+", default=list(FAMILIES), choices=FAMILIES,
                        help="families: adam, ours (with its aligned layout under the distributed optimizer), "
                             "mcore (every megatron-core Muon mode of the layout), deepspeed (ds-zero1 only)")
    parser.add_argument("--model", choices=("auto", "dense-0.75b", "moonlight-mini-gpu"), default="auto",
                        help="auto: the dense GPT for every Megatron layout but ep2, which needs the MoE model")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per run (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations after the measurement step")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run (default 240, --tiny 600)")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: gloo ranks, toy sizes")
    parser.add_argument("--profile", action="store_true",
                        help="for ours, profile one more optimizer step (torch.profiler) and keep its top kernels")
    args = parser.parse_args(argv)
    if args.model == "dense-0.75b" and "ep2" in args.layouts:
        parser.error("--layouts ep2 needs an MoE model: --model moonlight-mini-gpu (or auto)")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    args.timeout = args.timeout or (600.0 if args.tiny else 240.0)
    set_process_env()
    import torch

    if not args.tiny and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        raise SystemExit("two_gpu.py needs 2 CUDA devices (or --tiny for the CPU dry run); "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} visible")
    os.makedirs(args.out, exist_ok=True)
    have_megatron = importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core")
    have_emerging = importlib.util.find_spec("emerging_optimizers") is not None
    started = time.perf_counter()
    rows: list[dict] = []
    meta = {
        "where": ("CPU, gloo, toy sizes (--tiny)" if args.tiny
                  else f"{torch.cuda.get_device_name(0)} x 2, NCCL"),
        "torch": torch.__version__, "layouts": args.layouts, "optimizers": args.optimizers, "iters": args.iters,
        "warmup": args.warmup, "lr": LR, "weight_decay": WD, "clip_grad": CLIP, "measure_lr": MEASURE_LR,
        "emerging_optimizers": _version("emerging_optimizers") if have_emerging else None,
        "megatron_core": _version("megatron-core"), "deepspeed": _version("deepspeed"),
    }
    log(f"[two_gpu] {meta['where']}; megatron-core {meta['megatron_core']}, emerging_optimizers "
        f"{meta['emerging_optimizers'] or 'not installed'}, DeepSpeed {meta['deepspeed']}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts:
            layout = LAYOUTS[name]
            if name == "ds-zero1":
                rows += run_deepspeed(args, args.optimizers, tmp)
                _save(args.out, rows, meta)
                continue
            model = args.model if args.model != "auto" else ("moonlight-mini-gpu" if layout.moe else "dense-0.75b")
            jobs = []
            for variant in megatron_variants(layout, args.optimizers):
                job = {"id": f"{name}.{variant}", "layout": name, "variant": variant, "model": model,
                       "tiny": args.tiny, "iters": args.iters, "warmup": args.warmup, "profile": args.profile}
                if not have_megatron:
                    rows.append({**job, "status": "megatron-core not installed"})
                elif variant.startswith("mcore") and not have_emerging:
                    rows.append({**job, "status": "not installed", "description": describe_variant(layout, variant)})
                    log(f"[{job['id']}] emerging_optimizers not installed: skipped")
                else:
                    jobs.append(job)
            rows += run_layout(layout, jobs, args, tmp)
            _save(args.out, rows, meta)
    meta["total_s"] = time.perf_counter() - started
    text = _save(args.out, rows, meta)
    log(f"[two_gpu] all runs took {meta['total_s']:.0f} s; wrote {args.out}/results.json and results.md\n")
    print(text, flush=True)
    return 0


def run_layout(layout: Layout, jobs: list[dict], args, tmp: str) -> list[dict]:
    """Every run of one layout in one spawned world; when the world dies (a crash, or a rank left
    in a collective by a failed peer), the run it was in is recorded as failed and a new world
    takes the runs not yet started."""
    rows, remaining = [], list(jobs)
    while remaining:
        began = time.perf_counter()
        ok, message = run_world(megatron_worker, layout.world, (remaining, tmp), cuda=not args.tiny,
                                timeout=args.timeout * len(remaining))
        wall = time.perf_counter() - began
        finished, left = [], []
        for job in remaining:
            path = os.path.join(tmp, job["id"])
            errors = sorted(f for f in os.listdir(tmp) if f.startswith(job["id"] + ".error."))
            if os.path.exists(path + ".json"):
                with open(path + ".json") as f:
                    row = json.load(f)
                log(f"[{job['id']}] iteration {row['iteration_ms']:.1f} ms, step {row['step_ms']:.1f} ms, "
                    f"peak {_mib(row['peak_gpu_bytes'])} MiB, update errors {_error_cell(row['update_errors'])}")
            elif errors or os.path.exists(path + ".started"):
                text = ""
                for e in errors:
                    with open(os.path.join(tmp, e)) as f:
                        text = f.read()
                    break
                text = "\n".join(text.strip().splitlines()[-20:]) or message or "the world ended during this run"
                row = {**job, "status": "failed", "description": describe_variant(layout, job["variant"]), "error": text}
                log(f"[{job['id']}] FAILED:\n{text}")
            else:
                left.append(job)
                continue
            finished.append(row)
        for row in finished:
            row["wall_s"] = wall / len(finished)
        rows += finished
        if left and not finished:  # the world died before its first run: record and stop
            rows += [{**job, "status": "failed", "description": describe_variant(layout, job["variant"]),
                      "error": message or "the world ended before this run"} for job in left]
            log(f"[{layout.name}] the world ended before its first run:\n{message}")
            break
        if not ok and left:
            log(f"[{layout.name}] the world ended ({message.splitlines()[-1] if message else '?'}); "
                f"a new one takes the {len(left)} run(s) left")
        remaining = left
    return rows


def _version(dist_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None


def _save(out: str, rows: list[dict], meta: dict) -> str:
    text = tables(rows, meta)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
