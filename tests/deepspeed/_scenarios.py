"""Scenarios run inside a spawned DeepSpeed world (see ``_harness``); each is
``fn(rank, world, workdir) -> result`` and must make the same collective calls on every rank."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import muon_megatron.deepspeed as mmds
from _model import make_model, micro_batch

LR, WD = 1e-2, 0.1
STEPS = 4


def ds_config(stage: int, *, gas: int = 1, clip: float = 1.0, ns_dtype: str = "float32", params=None, **top) -> dict:
    """Our Muon at Moonlight settings except lr (large, so 4 steps move the weights) and float32 NS."""
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
        "optimizer": {"type": "muon", "params": {"lr": LR, "weight_decay": WD, "ns_dtype": ns_dtype, **(params or {})}},
        "zero_optimization": {"stage": stage},
    }
    cfg.update(top)
    return cfg


def train(engine, rank: int, steps, gas: int, scale_loss=None) -> list[float]:
    losses = []
    for step in steps:
        for micro in range(gas):
            loss = engine(*micro_batch(step, micro, rank))
            if scale_loss is not None:
                loss = loss * scale_loss(step, micro)
            engine.backward(loss)
            engine.step()
        losses.append(loss.detach().float().item())
    return losses


def weights(model) -> dict:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


class CountNS:
    """Counts the matrices this rank orthogonalises, from the distributed runtime's record of each
    step (``MuonExchange.orthogonalized``), by wrapping the step of each inner optimizer."""

    def __init__(self, engine):
        self.inners, self.count = engine.basic_optimizer.inner_optimizers(), 0

    def __enter__(self):
        for inner in self.inners:
            original = inner.step

            def counting(*args, _inner=inner, _original=original, **kwargs):
                out = _original(*args, **kwargs)
                self.count += len(_inner.exchange.orthogonalized)
                return out

            inner.step = counting
        return self

    def __exit__(self, *exc):
        for inner in self.inners:
            del inner.step

    def world_total(self) -> int:
        t = torch.tensor([self.count])
        dist.all_reduce(t)
        return int(t.item())


def _holders(optimizer) -> dict:
    """Matrix name -> ranks holding a piece of it, from the distributed plans."""
    out = {}
    for inner in optimizer.inner_optimizers():
        for m in inner.plan.matrices:
            out[m.name] = sorted({h.rank for h in m.returns})
    return out


def _parity(rank, world, stage, *, gas=1, clip=1.0, extra=None):
    model = make_model(0)
    engine, _, _, _ = mmds.initialize(model=model, config=ds_config(stage, gas=gas, clip=clip, **(extra or {})))
    with CountNS(engine) as ns:
        losses = train(engine, rank, range(STEPS), gas)
    return {
        "weights": weights(model),
        "ns_matrices": ns.world_total(),
        "holders": _holders(engine.basic_optimizer),
        "wrapper": engine.basic_optimizer.bound_to,
        "losses": losses,
        # every inner optimizer runs Newton-Schulz through the configured ns_backend ("auto")
        "ns_backends": sorted({type(inner.orthogonalize).__name__ for inner in engine.basic_optimizer.inner_optimizers()}),
    }


def parity_zero0(rank, world, workdir):
    return _parity(rank, world, 0)


def parity_zero1(rank, world, workdir):
    return _parity(rank, world, 1)


def parity_zero2(rank, world, workdir):
    return _parity(rank, world, 2)


def parity_zero1_accumulation(rank, world, workdir):
    return _parity(rank, world, 1, gas=3)


def parity_zero1_strong_clipping(rank, world, workdir):
    return _parity(rank, world, 1, clip=0.05)


def parity_zero1_no_clipping(rank, world, workdir):
    return _parity(rank, world, 1, clip=0.0)


def parity_zero0_accumulation(rank, world, workdir):
    return _parity(rank, world, 0, gas=2, clip=0.05)


def _resume(rank, world, workdir, stage):
    cfg = ds_config(stage)
    model = make_model(0)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    train(engine, rank, range(0, 2), 1)
    engine.save_checkpoint(workdir, tag="mid")
    train(engine, rank, range(2, 4), 1)
    straight = weights(model)
    model2 = make_model(1)  # other initial weights: everything must come from the checkpoint
    engine2, _, _, _ = mmds.initialize(model=model2, config=cfg)
    engine2.load_checkpoint(workdir, tag="mid")
    train(engine2, rank, range(2, 4), 1)
    return {"straight": straight, "resumed": weights(model2)}


def resume_zero0(rank, world, workdir):
    return _resume(rank, world, workdir, 0)


def resume_zero1(rank, world, workdir):
    return _resume(rank, world, workdir, 1)


def adamw_checkpoint_into_muon(rank, world, workdir):
    """An AdamW ZeRO-1 checkpoint: loading its optimizer state into Muon must fail with a message;
    loading the weights alone must work and train."""
    adam_cfg = ds_config(1)
    adam_cfg["optimizer"] = {"type": "adamw", "params": {"lr": LR, "weight_decay": WD, "torch_adam": True}}
    model = make_model(0)
    engine, _, _, _ = mmds.initialize(model=model, config=adam_cfg)
    train(engine, rank, range(0, 2), 1)
    engine.save_checkpoint(workdir, tag="adam")
    saved = weights(model)
    muon_engine, _, _, _ = mmds.initialize(model=make_model(1), config=ds_config(1))
    message = None
    try:
        muon_engine.load_checkpoint(workdir, tag="adam")
    except mmds.ForeignOptimizerStateError as err:
        message = str(err)
    model3 = make_model(1)
    engine3, _, _, _ = mmds.initialize(model=model3, config=ds_config(1))
    engine3.load_checkpoint(workdir, tag="adam", load_optimizer_states=False, load_lr_scheduler_states=False,
                            load_module_only=True)
    loaded = weights(model3)
    losses = train(engine3, rank, range(2, 4), 1)
    return {"message": message, "saved": saved, "loaded": loaded, "losses": losses}


def fp16_overflow_skips_step(rank, world, workdir):
    """fp16 ZeRO-1: a micro-batch whose loss is inf must skip the step on every rank, leaving the
    fp32 weights and the Muon momentum bitwise as they were, and halve the loss scale."""
    from deepspeed.accelerator import get_accelerator

    # Test shim: DeepSpeed's CPU accelerator reports fp16 unsupported on CPUs without AVX512-FP16,
    # although torch computes this tiny model in fp16 on any CPU.
    get_accelerator().is_fp16_supported = lambda: True
    cfg = ds_config(1, fp16={"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000,
                                       "hysteresis": 1})
    model = make_model(0)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    train(engine, rank, range(0, 1), 1)
    zero = engine.optimizer
    before_master = [t.detach().clone() for t in zero.single_partition_of_fp32_groups]
    before_state = copy.deepcopy({i: dict(v) for i, v in engine.basic_optimizer.state_dict()["state"].items()})
    scale_before = zero.loss_scale
    bad_rank = world - 1
    train(engine, rank, range(1, 2), 1, scale_loss=lambda s, m: float("inf") if rank == bad_rank else 1.0)
    after_master = [t.detach().clone() for t in zero.single_partition_of_fp32_groups]
    after_state = engine.basic_optimizer.state_dict()["state"]
    same_state = before_state.keys() == after_state.keys() and all(
        torch.equal(before_state[i][k], after_state[i][k]) for i in before_state for k in before_state[i]
        if torch.is_tensor(before_state[i][k])
    )
    train(engine, rank, range(2, 3), 1)
    moved = any(not torch.equal(a, b) for a, b in zip(after_master, zero.single_partition_of_fp32_groups))
    return {
        "master_unchanged": all(torch.equal(a, b) for a, b in zip(before_master, after_master)),
        "state_unchanged": same_state,
        "scale_before": float(scale_before),
        "scale_after": float(zero.loss_scale),
        "moved_after": moved,
        "weights_finite": all(torch.isfinite(p).all().item() for p in model.parameters()),
        "skipped_steps": engine.skipped_steps,
        "inner_skipped": sum(inner.skipped_steps for inner in engine.basic_optimizer.inner_optimizers()),
    }


def bf16_zero1(rank, world, workdir):
    model = make_model(0)
    engine, _, _, _ = mmds.initialize(model=model, config=ds_config(1, bf16={"enabled": True}, ns_dtype="bfloat16"))
    train(engine, rank, range(STEPS), 1)
    return {"weights": weights(model), "wrapper": engine.basic_optimizer.bound_to}


def builtin_switch_keeps_deepspeed_muon(rank, world, workdir):
    cfg = ds_config(1)
    # torch_adam: the built-in's auxiliary Adam without DeepSpeed's JIT-built FusedAdam op.
    cfg["optimizer"]["params"] = {"lr": LR, "weight_decay": WD, "implementation": "deepspeed", "torch_adam": True}
    engine, _, _, _ = mmds.initialize(model=make_model(0), config=cfg)
    return type(engine.basic_optimizer).__name__


def install_routes_plain_initialize(rank, world, workdir):
    import deepspeed

    mmds.install()
    try:
        engine, _, _, _ = deepspeed.initialize(model=make_model(0), config=ds_config(1))
    finally:
        mmds.uninstall()
    restored = deepspeed.initialize is not mmds.initialize
    return {"optimizer": type(engine.basic_optimizer).__name__, "bound": engine.basic_optimizer.bound_to,
            "restored": restored}


def lr_scheduler_reaches_muon(rank, world, workdir):
    """A DeepSpeed scheduler edits the public param groups; each step must use that lr."""
    cfg = ds_config(1, scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                                  "warmup_num_steps": 4, "warmup_type": "linear"}})
    engine, _, _, _ = mmds.initialize(model=make_model(0), config=cfg)
    used, public = [], []
    for step in range(3):
        public.append([g["lr"] for g in engine.optimizer.param_groups])
        train(engine, rank, range(step, step + 1), 1)
        used.append([inner.param_groups[0]["lr"] for inner in engine.basic_optimizer.inner_optimizers()])
    return {"public_before_step": public, "used": used}


def _tensor_parallel(rank, world, stage):
    from _model import TensorParallelTinyLM, TensorParallelUnit

    mpu = TensorParallelUnit(2)
    model = TensorParallelTinyLM(make_model(0), mpu)
    engine, _, _, _ = mmds.initialize(model=model, config=ds_config(stage, clip=0.0), mpu=mpu)
    with CountNS(engine) as ns:
        train(engine, mpu.dp_rank, range(STEPS), 1)
    return {"weights": model.full_weights(), "ns_matrices": ns.world_total(), "dp": mpu.dp,
            "holders": _holders(engine.basic_optimizer)}


def tensor_parallel_zero0(rank, world, workdir):
    return _tensor_parallel(rank, world, 0)


def tensor_parallel_zero1(rank, world, workdir):
    return _tensor_parallel(rank, world, 1)


def moe_experts_orthogonalised_each_on_its_own(rank, world, workdir):
    """A DeepSpeed MoE layer (4 experts over an expert-parallel group of ``world``): ZeRO-1 runs with
    the expert groups DeepSpeed requires, each local expert matrix is a matrix of its own in the plan,
    and the first step's update of each (momentum starts at zero) is ``scale * NS(g)`` of that expert
    alone: its singular values are either ~0 (expert gradients have the rank of the few tokens
    routed to it) or inside Moonlight's NS5 band."""
    from muon_megatron.core.newton_schulz import MOONLIGHT_SINGULAR_VALUE_BAND
    from muon_megatron.core.update import update_scale

    model = _moe_lm(world, rank)  # experts on different ranks differ
    engine, _, _, _ = mmds.initialize(model=model, config=ds_config(1, clip=0.0, params={"weight_decay": 0.0}))
    experts = {n: p for n, p in model.named_parameters() if "experts" in n}
    before = {n: p.detach().clone() for n, p in experts.items()}
    train(engine, rank, range(1), 1)
    bands = {}
    for n, p in experts.items():
        O = (before[n] - p.detach()) / (LR * update_scale("moonlight", *p.shape))
        s = torch.linalg.svdvals(O.double())
        bands[n] = s.tolist()
    losses = train(engine, rank, range(1, 3), 1)
    groups = engine.basic_optimizer.param_groups
    return {
        "bands": bands,
        "band": MOONLIGHT_SINGULAR_VALUE_BAND,
        "moe_groups": [g.get("name") for g in groups if g.get("moe")],
        "moe_group_sizes": [inner.world_size for g, inner in zip(groups, engine.basic_optimizer.inner_optimizers())
                            if g.get("moe")],
        "losses": losses,
        "holders": _holders(engine.basic_optimizer),
    }


def universal_checkpoint_dp2_to_dp1(rank, world, workdir):
    """Save at DP ``world`` with ZeRO-1, convert with muon_megatron's universal converter, reload at
    DP 1 (gradient accumulation over the same global batch) and continue: the weights must equal
    those of training straight through at DP ``world``."""
    import os

    from muon_megatron.deepspeed.universal import convert_to_universal

    shared = os.environ.get("MUON_DS_SHARED_DIR", workdir)
    cfg = ds_config(1)
    model = make_model(0)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    train(engine, rank, range(0, 2), 1)
    engine.save_checkpoint(shared, tag="mid")
    if rank == 0:
        convert_to_universal(os.path.join(shared, "mid"), os.path.join(shared, "mid_universal"))
    dist.barrier()
    train(engine, rank, range(2, 4), 1)
    return {"straight": weights(model), "world": world}


def universal_checkpoint_load_at_dp1(rank, world, workdir):
    import os

    shared = os.environ["MUON_DS_SHARED_DIR"]
    saved_world = 2
    cfg = ds_config(1, gas=saved_world, checkpoint={"load_universal": True})
    model = make_model(1)
    engine, _, _, _ = mmds.initialize(model=model, config=cfg)
    engine.load_checkpoint(shared, tag="mid_universal")
    for step in range(2, 4):
        for micro in range(saved_world):  # DP rank r's micro-batch becomes micro-step r
            engine.backward(engine(*micro_batch(step, 0, micro)))
            engine.step()
    return {"resumed": weights(model)}


def half_precision_zero0(rank, world, workdir):
    """ZeRO-0 with fp16 and with bf16: DeepSpeed wraps our optimizer in its FP16_UnfusedOptimizer
    (fp32 master copies per parameter); both train and track the float32 reference loosely."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True  # CPU test shim, see fp16_overflow_skips_step
    out = {}
    for precision in ("fp16", "bf16"):
        model = make_model(0)
        extra = {precision: {"enabled": True, **({"initial_scale_power": 8} if precision == "fp16" else {})}}
        engine, _, _, _ = mmds.initialize(model=model, config=ds_config(0, **extra))
        train(engine, rank, range(STEPS), 1)
        out[precision] = {"weights": weights(model), "wrapper": engine.basic_optimizer.bound_to,
                          "skipped": engine.skipped_steps}
    return out


# ---- Scenarios added for the NCCL parity runner (tests/gpu/run_nccl_parity.py); they run under gloo too --------


def parity_zero1_ns_bf16(rank, world, workdir):
    """:func:`parity_zero1` with Newton-Schulz in bfloat16 (float32 weights and gradients)."""
    return _parity(rank, world, 1, extra={"ns_dtype": "bfloat16"})


def parity_zero2_ns_bf16(rank, world, workdir):
    """:func:`parity_zero2` with Newton-Schulz in bfloat16 (float32 weights and gradients)."""
    return _parity(rank, world, 2, extra={"ns_dtype": "bfloat16"})


def _moe_lm(world: int, rank: int):
    """The model of :func:`moe_experts_orthogonalised_each_on_its_own`: embedding, one DeepSpeed MoE
    layer of 4 GELU experts (up 16 -> 24, down 24 -> 16) over an expert-parallel group of ``world``
    (top-1 gate, capacity for every token), LM head; experts drawn per rank so they differ."""
    from deepspeed.moe.layer import MoE
    from torch import nn

    from _model import HIDDEN, VOCAB

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(HIDDEN, 24, bias=False)
            self.down = nn.Linear(24, HIDDEN, bias=False)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    class MoELM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(VOCAB, HIDDEN)
            self.moe = MoE(HIDDEN, Expert(), num_experts=4, ep_size=world, k=1, min_capacity=0, capacity_factor=4.0)
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

        def forward(self, tokens, targets):
            h, aux, _ = self.moe(self.embed(tokens))
            logits = self.lm_head(h).float()
            return nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1)) + 0.01 * aux

    model = MoELM()
    torch.manual_seed(100 + rank)
    for n, p in model.named_parameters():
        if "experts" in n:
            p.data.normal_(0, 0.2)
    return model


def moe_expert_first_update_vs_float64_ns(rank, world, workdir):
    """A DeepSpeed MoE model (4 experts over an expert-parallel group of ``world``, ZeRO-1, no weight
    decay, no clipping): after the first step, each local expert matrix W must have moved by
    ``-lr * 0.2 sqrt(max(A, B)) * NS(g)``, NS in float64 on that expert's own gradient g as autograd
    produced it on this rank. The momentum starts at zero and Newton-Schulz normalises its input, so
    the factors DeepSpeed applies to expert gradients (data-parallel averaging, Nesterov's 1 + mu)
    drop out. Returns the relative Frobenius error of each expert's update."""
    from muon_megatron.core.newton_schulz import newton_schulz
    from muon_megatron.core.update import update_scale

    model = _moe_lm(world, rank)
    engine, _, _, _ = mmds.initialize(model=model, config=ds_config(1, clip=0.0, params={"weight_decay": 0.0}))
    experts = {n: p for n, p in model.named_parameters() if "experts" in n}
    before = {n: p.detach().double().clone() for n, p in experts.items()}
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, g.detach().double().clone()))
             for n, p in experts.items()]
    train(engine, rank, range(1), 1)
    for hook in hooks:
        hook.remove()
    errors = {}
    for n, p in experts.items():
        update = (before[n] - p.detach().double()) / LR
        want = update_scale("moonlight", *p.shape) * newton_schulz(grads[n], 5, "moonlight", torch.float64)
        errors[n] = ((update - want).norm() / want.norm()).item()
    return {"errors": errors, "holders": _holders(engine.basic_optimizer)}


def universal_checkpoint_dp1_to_dp2(rank, world, workdir):
    """The reverse of :func:`universal_checkpoint_dp2_to_dp1`: two steps at DP 1 over the global batch
    of DP 2 (gradient accumulation 2, micro-step r = DP rank r's micro-batch), save, convert to a
    universal checkpoint (tag ``dp1_mid_universal`` under ``MUON_DS_SHARED_DIR``)."""
    import os

    from muon_megatron.deepspeed.universal import convert_to_universal

    shared = os.environ["MUON_DS_SHARED_DIR"]
    target_world = 2
    engine, _, _, _ = mmds.initialize(model=make_model(0), config=ds_config(1, gas=target_world))
    for step in range(0, 2):
        for micro in range(target_world):
            engine.backward(engine(*micro_batch(step, 0, micro)))
            engine.step()
    engine.save_checkpoint(shared, tag="dp1_mid")
    convert_to_universal(os.path.join(shared, "dp1_mid"), os.path.join(shared, "dp1_mid_universal"))
    return {"world": world}


def universal_checkpoint_load_at_dp2(rank, world, workdir):
    """Load :func:`universal_checkpoint_dp1_to_dp2`'s universal checkpoint at DP ``world`` (2) into a
    model with other initial weights and take steps 2 and 3."""
    import os

    shared = os.environ["MUON_DS_SHARED_DIR"]
    model = make_model(1)
    engine, _, _, _ = mmds.initialize(model=model, config=ds_config(1, checkpoint={"load_universal": True}))
    engine.load_checkpoint(shared, tag="dp1_mid_universal")
    train(engine, rank, range(2, 4), 1)
    return {"resumed": weights(model)}
