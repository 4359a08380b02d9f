"""Scenarios for ZeRO-3, optimizer offload and DeepSpeed's BF16_Optimizer, run inside a spawned
DeepSpeed world like those of ``_scenarios`` (the harness looks names up there first, then here).

Every scenario returns the full weights (gathered from the ZeRO-3 partitions where there are any)
and what the tests need to check that it exercised what its name says: the wrapper the adapter
bound to, the matrices orthogonalised per optimizer step, the ranks holding each matrix.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import _scenarios as base
import muon_megatron.deepspeed as mmds
from _model import make_model

STEPS = base.STEPS
#: Gradient clipping of every scenario here: the gradient norm of these steps is about 0.5, so
#: clipping acts (on gradients, before momentum; at ZeRO-3 with the norm over all sub-groups).
CLIP = 0.1
#: TinyLM's widths here: fc1 23 x 15 (345 elements: ZeRO-3 pads it at DP 2 and 4), fc2 20 x 23 and
#: proj 15 x 20 (300), so ZeRO-3's partitions start and end in the middle of rows.
SHAPE = {"hidden": 15, "ffn": 23}
#: Gradient accumulation of the scenarios that accumulate; the others take the same global batch in
#: one micro-batch of GAS x 4 sequences (the 4 micro-batches concatenated).
GAS = 4


def full_weights(model) -> dict:
    """Float32 copies of every parameter; ZeRO-3 partitions are gathered first (collective)."""
    params = list(model.parameters())
    if not any(hasattr(p, "ds_shape") for p in params):
        return base.weights(model)
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return base.weights(model)


def master_weights(model) -> dict:
    """The fp32 master copy of every parameter, gathered from the optimizer's partitions
    (``deepspeed.utils.safe_get_full_fp32_param``; collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in model.named_parameters()}


def whole_batch(step: int, rank: int):
    """The GAS micro-batches of (step, rank) as one micro-batch (same sequences, same mean loss)."""
    parts = [base.micro_batch(step, m, rank) for m in range(GAS)]
    return torch.cat([t for t, _ in parts]), torch.cat([y for _, y in parts])


def train_whole_batches(engine, rank: int, steps) -> None:
    for step in steps:
        engine.backward(engine(*whole_batch(step, rank)))
        engine.step()


def zero3_config(*, gas: int = 1, offload: bool = False, sub_group_size=None, **top) -> dict:
    cfg = base.ds_config(3, gas=gas, clip=CLIP, **top)
    cfg["train_micro_batch_size_per_gpu"] = 4 if gas > 1 else 4 * GAS
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if sub_group_size is not None:
        cfg["zero_optimization"]["sub_group_size"] = sub_group_size
    return cfg


def _run(rank, model, cfg, *, accumulate: bool, steps=range(STEPS), masters: bool = False) -> dict:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # DeepSpeed moves a model to the accelerator itself below ZeRO-3 only; at ZeRO-3 (without
        # zero.Init) the user does, or its parameter broadcast meets CPU tensors on NCCL.
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    with base.CountNS(engine) as ns:
        if accumulate:
            base.train(engine, rank, steps, cfg["gradient_accumulation_steps"])
        else:
            train_whole_batches(engine, rank, steps)
    optimizer = engine.basic_optimizer
    return {
        "weights": full_weights(model),
        "masters": master_weights(model) if masters else None,
        "ns_matrices": ns.world_total(),
        "wrapper": optimizer.bound_to,
        "holders": base._holders(optimizer),
        "inner_optimizers": len(optimizer.inner_optimizers()),
        "optimizer_steps": engine.global_steps,
        "muon_state_device": sorted({str(v.device) for s in optimizer.state.values() for k, v in s.items()
                                     if k == "momentum_buffer"}),
    }


# ---- ZeRO-3 parity --------------------------------------------------------------------------------


def zero3_whole_batch(rank, world, workdir):
    """ZeRO-3, each step's global batch in one micro-batch per rank."""
    return _run(rank, make_model(0, **SHAPE), zero3_config(), accumulate=False)


def zero3_accumulation_subgroups(rank, world, workdir):
    """ZeRO-3, the same global batch over 4 micro-batches per rank, and a sub_group_size that cuts
    each param group into two sub-groups (DeepSpeed steps them one at a time)."""
    return _run(rank, make_model(0, **SHAPE), zero3_config(gas=GAS, sub_group_size=200), accumulate=True)


def zero3_offload(rank, world, workdir):
    """ZeRO-3 with offload_optimizer and offload_param to the CPU (fp32 masters and momentum, and the
    bit16 partitions, in CPU memory)."""
    cfg = zero3_config(offload=True)
    cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    return _run(rank, make_model(0, **SHAPE), cfg, accumulate=False)


def zero3_zero_init(rank, world, workdir):
    """A model built under deepspeed.zero.Init: partitioned at construction, every parameter a 1-D
    placeholder; routing must read ds_shape. Also records what the routing saw."""
    import deepspeed

    cfg = zero3_config()
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = make_model(0, **SHAPE)
    placeholders = {n: (tuple(p.shape), tuple(p.ds_shape)) for n, p in model.named_parameters()}
    groups = mmds.build_param_groups(model, mmds.MuonConfig.from_params({}))
    routed = {n: bool(g["use_muon"]) for g in groups for n in g["names"]}
    out = _run(rank, model, cfg, accumulate=False)
    out.update(placeholders=placeholders, routed=routed)
    return out


def _offload(rank, stage: int) -> dict:
    out = {}
    for offload in (False, True):
        cfg = base.ds_config(stage, gas=GAS, clip=CLIP)
        if offload:
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        out["offload" if offload else "plain"] = _run(rank, make_model(0, **SHAPE), cfg, accumulate=True)
    return out


def offload_zero1(rank, world, workdir):
    return _offload(rank, 1)


def offload_zero2(rank, world, workdir):
    return _offload(rank, 2)


# ---- bf16 -----------------------------------------------------------------------------------------


def bf16_optimizer_zero1(rank, world, workdir):
    """bf16 weights and activations with fp32 gradient accumulation at ZeRO-1: DeepSpeed's
    BF16_Optimizer (fp32 flat partitions, fp32 gradients), gradient accumulation 4."""
    cfg = base.ds_config(1, gas=GAS, clip=CLIP, bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    return _run(rank, make_model(0, **SHAPE), cfg, accumulate=True, masters=True)


def bf16_zero3(rank, world, workdir):
    """bf16 at ZeRO-3 (fp32 master partitions, bf16 gradients), the global batch in one micro-batch."""
    return _run(rank, make_model(0, **SHAPE), zero3_config(bf16={"enabled": True}), accumulate=False, masters=True)


# ---- checkpoints ----------------------------------------------------------------------------------


def zero3_resume(rank, world, workdir):
    """Save after 2 of 4 steps, then resume a model with other initial weights from it."""
    cfg = zero3_config(gas=GAS)
    model = make_model(0, **SHAPE)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    base.train(engine, rank, range(0, 2), GAS)
    engine.save_checkpoint(workdir, tag="mid")
    base.train(engine, rank, range(2, 4), GAS)
    straight = full_weights(model)
    model2 = make_model(1, **SHAPE)
    engine2, _, _, _ = mmds.initialize(model=model2, config=cfg)
    engine2.load_checkpoint(workdir, tag="mid")
    base.train(engine2, rank, range(2, 4), GAS)
    return {"straight": straight, "resumed": full_weights(model2)}


def zero3_adamw_checkpoint_refused(rank, world, workdir):
    """An AdamW ZeRO-3 checkpoint: its optimizer state is refused with ForeignOptimizerStateError;
    its weights load alone, as the message says, and train on."""
    cfg = zero3_config()
    cfg["optimizer"] = {"type": "adamw", "params": {"lr": base.LR, "weight_decay": base.WD, "torch_adam": True}}
    model = make_model(0, **SHAPE)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    train_whole_batches(engine, rank, range(1))
    engine.save_checkpoint(workdir, tag="adam")
    saved = full_weights(model)
    muon_engine, _, _, _ = mmds.initialize(model=make_model(1, **SHAPE), config=zero3_config())
    message = None
    try:
        muon_engine.load_checkpoint(workdir, tag="adam")
    except mmds.ForeignOptimizerStateError as err:
        message = str(err)
    model3 = make_model(1, **SHAPE)
    engine3, _, _, _ = mmds.initialize(model=model3, config=zero3_config())
    engine3.load_checkpoint(workdir, tag="adam", load_optimizer_states=False, load_lr_scheduler_states=False,
                            load_module_only=True)
    loaded = full_weights(model3)
    train_whole_batches(engine3, rank, range(1, 3))
    return {"message": message, "saved": saved, "loaded": loaded, "trained": full_weights(model3)}


def _shared_dir(workdir: str) -> str:
    return os.environ.get("MUON_DS_SHARED_DIR", workdir)


def zero3_universal_save(rank, world, workdir):
    """ZeRO-3 at DP ``world``: two steps, save, convert to universal form (rank 0), two more steps."""
    from muon_megatron.deepspeed.universal import convert_to_universal

    shared = _shared_dir(workdir)
    model = make_model(0, **SHAPE)
    engine, _, _, _ = mmds.initialize(model=model, config=zero3_config())
    train_whole_batches(engine, rank, range(0, 2))
    engine.save_checkpoint(shared, tag="z3")
    if rank == 0:
        convert_to_universal(os.path.join(shared, "z3"), os.path.join(shared, "z3_universal"))
    dist.barrier()
    train_whole_batches(engine, rank, range(2, 4))
    return {"straight": full_weights(model), "world": world}


def zero3_universal_load(rank, world, workdir):
    """Load :func:`zero3_universal_save`'s universal checkpoint (written at DP ``SAVED_WORLD``) at DP
    ``world`` into a model with other initial weights and take steps 2 and 3 on the same global
    batches: the saved run's rank r becomes micro-batch ``r % k`` of rank ``r // k`` here
    (k = SAVED_WORLD / world micro-batches per rank)."""
    shared = os.environ["MUON_DS_SHARED_DIR"]
    saved_world = int(os.environ["MUON_DS_SAVED_WORLD"])
    k = saved_world // world
    cfg = zero3_config(gas=k * GAS, checkpoint={"load_universal": True})
    model = make_model(1, **SHAPE)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    engine.load_checkpoint(shared, tag="z3_universal")
    momentum_loaded = any("momentum_buffer" in s and bool(s["momentum_buffer"].any())
                          for s in engine.basic_optimizer.state.values())
    for step in range(2, 4):
        for saved_rank in range(rank * k, (rank + 1) * k):
            for m in range(GAS):
                engine.backward(engine(*base.micro_batch(step, m, saved_rank)))
                engine.step()
    return {"resumed": full_weights(model), "momentum_loaded": momentum_loaded}
