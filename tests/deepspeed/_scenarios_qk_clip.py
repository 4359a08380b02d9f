"""QK-Clip scenarios run inside a spawned DeepSpeed world (see ``_harness``); each is
``fn(rank, world, workdir) -> result`` and makes the same collective calls on every rank.

The trained scenarios take three optimizer steps at learning rates ``LRS``: the first at lr 0, so
the weights change by QK-Clip alone (the clipped heads' max logit must then land exactly on tau),
the others at ``LR`` (parity with the single-process reference: Muon, then the clip). Each returns
what the float64 references of ``test_deepspeed_qk_clip`` need: every attention layer's inputs per
step (this rank's micro-batches), the weights after every step, the adapter's telemetry, tau.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import muon_megatron.deepspeed as mmds
from _qk_clip_model import KINDS, TAU, capture_attention_inputs
from muon_megatron.core.qk_clip import MaxLogitRecorder

LR, WD = 1e-2, 0.1
LRS = (0.0, LR, LR)
#: (kind, ZeRO stage, gradient accumulation, ZeRO options) of each trained scenario
TRAINED = {
    "qk_clip_gqa_zero0": ("gqa", 0, 1, {}),
    "qk_clip_mla_zero0": ("mla", 0, 1, {}),
    "qk_clip_gqa_zero1": ("gqa", 1, 2, {}),
    "qk_clip_mla_zero1": ("mla", 1, 1, {}),
    "qk_clip_gqa_zero2_offload": ("gqa", 2, 1, {"offload_optimizer": {"device": "cpu"}}),
    "qk_clip_gqa_zero3": ("gqa", 3, 1, {}),
}


def qk_config(stage: int, *, gas: int = 1, tau=None, params=None, **top) -> dict:
    extra = {} if tau is None else {"qk_clip_threshold": tau}
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "muon", "params": {"lr": LR, "weight_decay": WD, "ns_dtype": "float32", **extra,
                                                 **(params or {})}},
        "zero_optimization": {"stage": stage},
    }
    cfg.update(top)
    return cfg


def _weights(model) -> dict:
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: gather the partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _on(engine, tensors):
    """A micro-batch on the engine's device (the CPU here; the rank's GPU under NCCL)."""
    return tuple(t.to(engine.device) for t in tensors)


def _set_lr(engine, lr: float) -> None:
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def _train(engine, model, kind, rank, steps, gas, *, capture=False):
    """Steps ``steps`` (step i at ``LRS[i]``); returns per step the captured attention inputs (or
    None) and the weights after it."""
    _, batch, loss_fn, _ = KINDS[kind]
    out = []
    for step in steps:
        _set_lr(engine, LRS[step])
        inputs, handles = capture_attention_inputs(model, kind) if capture else (None, [])
        for micro in range(gas):
            loss = loss_fn(engine, *_on(engine, batch(step, micro, rank)))
            engine.backward(loss)
            engine.step()
        for h in handles:
            h.remove()
        out.append({"inputs": inputs, "weights": _weights(model), "stats": engine.basic_optimizer.last_qk_clip_stats})
    return out


def _declared_holders(optimizer, names) -> dict:
    """Declared parameter -> ranks holding a piece of it, from the distributed plans."""
    out = {}
    for inner in optimizer.inner_optimizers():
        for m in inner.plan.matrices:
            if m.name in names:
                out[m.name] = sorted({h.rank for h in m.returns})
    return out


def _trained(rank, world, workdir, name, **top):
    kind, stage, gas, zero = TRAINED[name]
    make = KINDS[kind][0]
    tau = TAU[kind]
    model = make(0)
    cfg = qk_config(stage, gas=gas, tau=tau, **top)
    cfg["zero_optimization"].update(zero)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    opt = engine.basic_optimizer
    steps = _train(engine, model, kind, rank, range(len(LRS)), gas, capture=True)
    declared = {n for layer in model.qk_clip_layers() for n in layer.params}
    pieces = {}  # declared parameter -> this rank's flat ranges of it
    for inner in opt.inner_optimizers():
        for group in inner.param_groups:
            for entry in group.get("layouts") or []:
                for layout, _ in (entry if isinstance(entry, list) else [(entry, 0)]):
                    if layout.key in declared:
                        pieces.setdefault(layout.key, []).append(layout.kept_range)
    return {"tau": tau, "steps": steps, "wrapper": opt.bound_to, "holders": _declared_holders(opt, declared),
            "pieces": pieces, "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks))}


def qk_clip_gqa_zero0(rank, world, workdir):
    return _trained(rank, world, workdir, "qk_clip_gqa_zero0")


def qk_clip_mla_zero0(rank, world, workdir):
    return _trained(rank, world, workdir, "qk_clip_mla_zero0")


def qk_clip_gqa_zero1(rank, world, workdir):
    """Also writes the telemetry through DeepSpeed's CSV monitor (rank 0 writes it)."""
    out = _trained(rank, world, workdir, "qk_clip_gqa_zero1",
                   csv_monitor={"enabled": True, "output_path": workdir, "job_name": "qk"})
    csv = {}
    if rank == 0:
        folder = os.path.join(workdir, "qk")
        for fname in os.listdir(folder):
            if fname.startswith("Train_Samples_qk_clip"):
                with open(os.path.join(folder, fname)) as f:
                    csv[fname[: -len(".csv")]] = [line.strip().split(",") for line in f if line.strip()]
    out["csv"] = csv
    return out


def qk_clip_mla_zero1(rank, world, workdir):
    return _trained(rank, world, workdir, "qk_clip_mla_zero1")


def qk_clip_gqa_zero2_offload(rank, world, workdir):
    return _trained(rank, world, workdir, "qk_clip_gqa_zero2_offload")


def qk_clip_gqa_zero3(rank, world, workdir):
    return _trained(rank, world, workdir, "qk_clip_gqa_zero3")


def qk_clip_off_is_unchanged(rank, world, workdir):
    """ZeRO-1, GQA model, three steps: without the key, with ``qk_clip_threshold`` null, and with a
    threshold no head reaches; the weights of all three must be bitwise equal."""
    out = {}
    runs = (("absent", {}), ("null", {"qk_clip_threshold": None}), ("unreached", {"qk_clip_threshold": 1e6}))
    for label, params in runs:
        model = KINDS["gqa"][0](0)
        engine, _, _, _ = mmds.initialize(model=model, config=qk_config(1, params=params))
        steps = _train(engine, model, "gqa", rank, range(len(LRS)), 1)
        opt = engine.basic_optimizer
        stats = opt.last_qk_clip_stats
        out[label] = {"weights": steps[-1]["weights"], "qk_clip": opt.qk_clip is not None,
                      "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
                      "clipped": None if stats is None else stats.clipped_heads_total,
                      "max_logit": None if stats is None else stats.max_logit_overall}
    return out


def qk_clip_resume(rank, world, workdir):
    """ZeRO-1 with clipping: save after two steps, two more; a fresh engine (other initial weights)
    loads the checkpoint and takes the same two steps: bitwise the same weights."""
    tau = TAU["gqa"]
    cfg = qk_config(1, tau=tau)
    make = KINDS["gqa"][0]

    def steps(engine, model, rng):
        _, batch, loss_fn, _ = KINDS["gqa"]
        clipped = []
        for step in rng:
            engine.backward(loss_fn(engine, *_on(engine, batch(step, 0, rank))))
            engine.step()
            clipped.append(engine.basic_optimizer.last_qk_clip_stats.clipped_heads_total)
        return clipped

    model = make(0)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    first = steps(engine, model, range(0, 2))
    engine.save_checkpoint(workdir, tag="mid")
    later = steps(engine, model, range(2, 4))
    straight = _weights(model)
    model2 = make(1)
    engine2, _, _, _ = mmds.initialize(model=model2, config=cfg)
    engine2.load_checkpoint(workdir, tag="mid")
    resumed_clipped = steps(engine2, model2, range(2, 4))
    return {"straight": straight, "resumed": _weights(model2), "clipped": first + later,
            "resumed_clipped": resumed_clipped}


def qk_clip_skipped_step(rank, world, workdir):
    """fp16 ZeRO-1 with clipping: step 1's loss is inf on the last rank, so DeepSpeed skips it. The
    fp32 masters must stay bitwise as they were (no clip either), the telemetry stays step 0's,
    and step 2 clips from its own forward pass only (the skipped step's maxima are dropped)."""
    from deepspeed.accelerator import get_accelerator

    # Test shim, as in _scenarios.fp16_overflow_skips_step: fp16 works on any CPU for this model.
    get_accelerator().is_fp16_supported = lambda: True
    _, batch, loss_fn, _ = KINDS["gqa"]
    tau = TAU["gqa"]
    model = KINDS["gqa"][0](0)
    cfg = qk_config(1, tau=tau, fp16={"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000,
                                      "hysteresis": 1})
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    opt, zero = engine.basic_optimizer, engine.optimizer
    recorder = opt.qk_clip.recorder

    engine.backward(loss_fn(engine, *batch(0, 0, rank)))
    engine.step()
    stats0 = opt.last_qk_clip_stats
    masters = [t.detach().clone() for t in zero.single_partition_of_fp32_groups]

    loss = loss_fn(engine, *batch(1, 0, rank))  # the skipped step's forward records its maxima
    skipped_maxima = {n: t.clone() for n, t in recorder.maxima.items()}
    engine.backward(loss * (float("inf") if rank == world - 1 else 1.0))
    engine.step()
    masters_unchanged = all(torch.equal(a, b) for a, b in zip(masters, zero.single_partition_of_fp32_groups))
    stats_after_skip = opt.last_qk_clip_stats

    # step 2's own maxima, measured on a copy of the model (same fp16 weights) outside the engine
    tokens, targets = batch(2, 0, rank)
    own = MaxLogitRecorder()
    twin = KINDS["gqa"][0](0).half()
    twin.load_state_dict(engine.module.state_dict())
    with own:
        twin(tokens, targets)
    engine.backward(loss_fn(engine, tokens, targets))
    before_step2 = {n: t.clone() for n, t in recorder.maxima.items()}
    engine.step()
    own_max = {n: t.clone() for n, t in own.maxima.items()}
    for t in own_max.values():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {
        "skipped_steps": engine.skipped_steps,
        "masters_unchanged": masters_unchanged,
        "stats_kept": stats_after_skip is stats0,
        "skipped_maxima": skipped_maxima,
        "recorded_step2": before_step2,
        "own_step2": {n: t for n, t in own.maxima.items()},
        "stats2": opt.last_qk_clip_stats,
        "own_step2_reduced": own_max,
        "tau": tau,
    }


def qk_clip_unrecorded_layer(rank, world, workdir):
    """A declared layer whose attention never records: the first optimizer step raises, naming it."""
    from muon_megatron.core.qk_clip import QKClipLayer

    from _qk_clip_model import GROUPS, HEAD_DIM, HEADS

    model = KINDS["gqa"][0](0)
    layers = model.qk_clip_layers()
    layers[1] = QKClipLayer(name="layers.1.attention", layout="separate", num_heads=HEADS, num_query_groups=GROUPS,
                            head_dim=HEAD_DIM, q=layers[1].q, k=layers[1].k)
    engine, _, _, _ = mmds.initialize(model=model, config=qk_config(0, tau=1.0), qk_clip_layers=layers)
    _, batch, loss_fn, _ = KINDS["gqa"]
    engine.backward(loss_fn(engine, *batch(0, 0, rank)))
    try:
        engine.step()
    except RuntimeError as err:
        return str(err)
    return None


def _bf16_masters(rank, world, stage, **top):
    """bf16 with fp32 masters (ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer, one master per parameter;
    ZeRO-1: flat fp32 partitions, of the ZeRO optimizer or of the BF16_Optimizer), one step at lr 0
    on the GQA model: returns the per-head maxima the step clipped from (the recorder's, MAX over
    ranks), the declared weights' fp32 masters before and after the step and the model's bf16
    weights after it."""
    from deepspeed.utils import safe_get_full_fp32_param

    model = KINDS["gqa"][0](0)
    cfg = qk_config(stage, tau=TAU["gqa"], bf16={"enabled": True}, **top)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    opt = engine.basic_optimizer
    declared = [n for layer in model.qk_clip_layers() for n in layer.params]
    params = dict(model.named_parameters())

    def masters():
        if stage == 0:
            by_name = {}
            for i, group in enumerate(engine.optimizer.fp32_groups):
                by_name.update(zip(opt.names(i), group))
            return {n: by_name[n].detach().clone() for n in declared}
        return {n: safe_get_full_fp32_param(params[n]).detach().clone() for n in declared}

    _, batch, loss_fn, _ = KINDS["gqa"]
    _set_lr(engine, 0.0)
    before = masters()
    engine.backward(loss_fn(engine, *_on(engine, batch(0, 0, rank))))
    maxima = {n: t.clone() for n, t in opt.qk_clip.recorder.maxima.items()}
    for t in maxima.values():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    engine.step()
    return {"wrapper": opt.bound_to, "maxima": maxima, "before": before, "after": masters(),
            "model": {n: params[n].detach().clone() for n in declared}, "dtype": str(params[declared[0]].dtype)}


def qk_clip_bf16_masters_zero0(rank, world, workdir):
    return _bf16_masters(rank, world, 0)


def qk_clip_bf16_masters_zero1(rank, world, workdir):
    return _bf16_masters(rank, world, 1)


def qk_clip_bf16_optimizer_zero1(rank, world, workdir):
    return _bf16_masters(rank, world, 1, data_types={"grad_accum_dtype": "fp32"})
