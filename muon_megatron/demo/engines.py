"""The demo's engine runners and its one training loop.

The model is :data:`muon_megatron.models.MOONLIGHT_MINI` (MLA, the first layer dense, then MoE
layers with shared experts and a sigmoid router with aux-loss-free expert bias, byte vocabulary),
trained on the same standard-library corpus and batches as the byte-level demo, Muon against AdamW
with the same lr schedule and weight decay (Moonlight, arXiv 2502.16982, section 2.2). Engines:

- ``torch``: :class:`~muon_megatron.models.torch_model.MoonlightModel` with
  :class:`muon_megatron.Muon` or ``torch.optim.AdamW`` in this process.
- ``deepspeed``: the same model through :func:`muon_megatron.deepspeed.initialize` under ZeRO
  stage 1 in a one-process gloo group on 127.0.0.1 (``DS_ACCELERATOR=cpu`` without CUDA);
  ``"type": "muon"`` for Muon, DeepSpeed's AdamW with ``torch_adam`` for AdamW (no JIT-built op).
- ``megatron``: megatron-core's ``GPTModel`` of the same spec
  (:func:`muon_megatron.models.megatron_config.build_gpt_model`) with
  :func:`muon_megatron.megatron.get_muon_optimizer`, and megatron-core's own Adam for AdamW. Needs
  CUDA (megatron-core allocates its gradient buffers on the current CUDA device).
- ``auto``: megatron when CUDA and megatron-core are present, else deepspeed when it imports,
  else torch.

Each engine is a small runner (``train_step(batch, lr) -> loss``, ``evaluate(batches)``) driven by
one loop, so the curves of different engines are comparable step for step. The torch and
DeepSpeed runs start from the same weights (same seed, same module); megatron-core initialises its
own weights, so its curves are comparable to each other, not bitwise to the others'. ``byte-lm``
(:mod:`.byte_lm`) has a runner of its own in plain torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import socket
import time

import torch
import torch.nn.functional as F

from .data import lr_factor, sample_batch
from .report import run_result

ENGINES = ("auto", "torch", "deepspeed", "megatron")
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.95), 1e-8


# --- engine choice -------------------------------------------------------------------------------


def _megatron_available() -> bool:
    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


def _deepspeed_imports() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        # Without CUDA DeepSpeed must be told to use its CPU accelerator before its first import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        return False, f"{type(err).__name__}: {err}"
    return True, ""


def choose_engine(requested: str) -> tuple[str, str]:
    """``(engine, reason)`` for ``--engine requested``; SystemExit when the engine cannot run here."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda and _megatron_available():
            return "megatron", "auto: CUDA and megatron-core are available"
        ok, why = _deepspeed_imports()
        if ok:
            return "deepspeed", ("auto: " + ("megatron-core is not installed" if cuda else "no CUDA device for megatron-core")
                                 + "; DeepSpeed imports")
        return "torch", f"auto: megatron-core needs CUDA{'' if cuda else ' (none here)'}, DeepSpeed does not import ({why})"
    if requested == "megatron":
        if not cuda:
            raise SystemExit(
                "--engine megatron needs a CUDA device: megatron-core allocates its gradient buffers on "
                "torch.cuda.current_device(). On this machine use --engine deepspeed (CPU, gloo) or --engine torch."
            )
        if not _megatron_available():
            raise SystemExit("--engine megatron needs megatron-core: pip install 'muon-megatron[megatron]'")
        return "megatron", "requested with --engine megatron"
    if requested == "deepspeed":
        ok, why = _deepspeed_imports()
        if not ok:
            raise SystemExit(f"--engine deepspeed: DeepSpeed does not import ({why}); "
                             "pip install 'muon-megatron[deepspeed]'")
        return "deepspeed", "requested with --engine deepspeed"
    return "torch", "requested with --engine torch"


# --- runners -------------------------------------------------------------------------------------


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class ByteLMRunner:
    """``--model byte-lm``: :class:`.byte_lm.ByteLM` with muon_megatron.Muon or torch AdamW."""

    def __init__(self, name: str, args, device: torch.device):
        from .byte_lm import ByteLM, ModelConfig, make_optimizer

        torch.manual_seed(args.seed)  # same initial weights for every optimizer
        cfg = ModelConfig(d_model=args.d_model, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
        self.model = ByteLM(cfg).to(device)
        self.optimizer = make_optimizer(name, self.model, args.lr, args.weight_decay, args.ns_dtype_resolved)
        self.device = device

    def train_step(self, batch: torch.Tensor, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.model.loss(batch.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        self.model.eval()
        loss = sum(float(self.model.loss(b.to(self.device))) for b in batches) / len(batches)
        self.model.train()
        return loss


class TorchRunner:
    """MoonlightModel with muon_megatron.Muon or torch AdamW, in this process."""

    def __init__(self, name: str, spec, args, device: torch.device):
        from ..core import Muon, muon_param_groups
        from ..models.torch_model import MoonlightModel

        torch.manual_seed(args.seed)  # same initial weights for every optimizer
        self.model = MoonlightModel(spec).to(device)
        if name == "muon":
            self.optimizer = Muon(muon_param_groups(self.model), lr=args.lr, weight_decay=args.weight_decay,
                                  ns_dtype=args.ns_dtype_resolved)
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                               weight_decay=args.weight_decay)
        self.device = device

    def train_step(self, batch: torch.Tensor, lr: float) -> float:
        batch = batch.to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = _lm_loss(self.model(batch[:, :-1]), batch[:, 1:])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.update_expert_bias_()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        self.model.eval()
        loss = sum(float(_lm_loss(self.model(b[:, :-1].to(self.device)), b[:, 1:].to(self.device))) for b in batches)
        self.model.train()
        return loss / len(batches)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_deepspeed_world() -> None:
    """A one-process gloo group on 127.0.0.1 for DeepSpeed (once per process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("LOCAL_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import logging

    import deepspeed
    import deepspeed.ops

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # One rank needs no shared-memory all-reduce: skip DeepSpeed's JIT build of that op (minutes
    # on a cold cache, and a C++ compiler the demo should not need).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class DeepSpeedRunner(TorchRunner):
    """The same MoonlightModel through muon_megatron.deepspeed.initialize, ZeRO stage 1."""

    def __init__(self, name: str, spec, args, device: torch.device):
        from .. import deepspeed as mmds
        from ..models.torch_model import MoonlightModel

        start_deepspeed_world()
        torch.manual_seed(args.seed)
        model = MoonlightModel(spec)
        ns_dtype = str(args.ns_dtype_resolved).replace("torch.", "")
        if name == "muon":
            optimizer = {"type": "muon", "params": {"lr": args.lr, "weight_decay": args.weight_decay, "ns_dtype": ns_dtype,
                                                    "adamw_betas": list(ADAMW_BETAS), "adamw_eps": ADAMW_EPS}}
        else:
            # torch_adam: torch's AdamW inside DeepSpeed, not its JIT-built FusedAdam/CPUAdam ops.
            optimizer = {"type": "adamw", "params": {"lr": args.lr, "weight_decay": args.weight_decay,
                                                     "betas": list(ADAMW_BETAS), "eps": ADAMW_EPS, "torch_adam": True}}
        config = {
            "train_micro_batch_size_per_gpu": args.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,  # as the torch engine: no clipping
            "steps_per_print": 10**9,
            "zero_optimization": {"stage": 1},
            "optimizer": optimizer,
        }
        self.engine, _, _, _ = mmds.initialize(model=model, config=config)
        self.model = self.engine.module
        self.device = self.engine.device

    def train_step(self, batch: torch.Tensor, lr: float) -> float:
        batch = batch.to(self.device)
        for group in self.engine.optimizer.param_groups:  # the groups DeepSpeed's schedulers edit
            group["lr"] = lr
        loss = _lm_loss(self.engine(batch[:, :-1]), batch[:, 1:])
        self.engine.backward(loss)
        self.engine.step()
        self.model.update_expert_bias_()
        return float(loss.detach())


class MegatronRunner:
    """megatron-core GPTModel of the spec, Megatron DDP, get_muon_optimizer or Megatron's Adam."""

    def __init__(self, name: str, spec, args, device: torch.device):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel as DDP
        from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from ..megatron import MuonSettings, get_muon_optimizer
        from ..models.megatron_config import build_gpt_model

        if not torch.distributed.is_initialized():
            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(key, value)
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            torch.cuda.set_device(0)
            torch.distributed.init_process_group("nccl")
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        torch.manual_seed(args.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
        model = build_gpt_model(spec, params_dtype=torch.float32).cuda()
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False)
        self.ddp = DDP(model.config, ddp_config, model)
        config = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=0.0, weight_decay=args.weight_decay,
                                 adam_beta1=ADAMW_BETAS[0], adam_beta2=ADAMW_BETAS[1], adam_eps=ADAMW_EPS,
                                 clip_grad=0.0, bf16=False, fp16=False, use_distributed_optimizer=False)
        if name == "muon":
            ns_dtype = str(args.ns_dtype_resolved).replace("torch.", "")
            self.optimizer = get_muon_optimizer(config, [self.ddp], MuonSettings(ns_dtype=ns_dtype))
        else:
            self.optimizer = get_megatron_optimizer(config, [self.ddp])
        self._finalize = finalize_model_grads
        self.model = model

    def _loss(self, module, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.cuda()
        inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        position_ids = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
        return module(inputs, position_ids, None, labels=labels).float().mean()

    def train_step(self, batch: torch.Tensor, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._loss(self.ddp, batch)
        loss.backward()
        # Gradient reduction and, with expert bias on, Megatron's aux-free router-bias update.
        self._finalize([self.ddp])
        ok, _, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("megatron-core reported a failed optimizer step")
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        self.ddp.eval()
        loss = sum(float(self._loss(self.ddp, b)) for b in batches) / len(batches)
        self.ddp.train()
        return loss


RUNNERS = {"torch": TorchRunner, "deepspeed": DeepSpeedRunner, "megatron": MegatronRunner}


# --- the loop ------------------------------------------------------------------------------------


def train_one(name: str, engine: str, spec, args, train, val_batches, device, progress, *,
              lr: float | None = None) -> dict:
    """Train one model (``spec``: a Moonlight-family spec, or ``"byte-lm"``) with optimizer ``name``
    on ``engine`` at peak lr ``lr`` (default ``args.lr``): the same batches, schedule and
    evaluations (every ``args.eval_every`` steps and after the last) for every optimizer and engine."""
    if lr is not None and lr != getattr(args, "lr", None):
        args = argparse.Namespace(**{**vars(args), "lr": lr})  # the runners read args.lr
    runner = ByteLMRunner(name, args, device) if spec == "byte-lm" else RUNNERS[engine](name, spec, args, device)
    warmup = max(1, int(args.steps * args.warmup))
    data_gen = torch.Generator().manual_seed(args.seed + 1)  # same batches for every optimizer
    train_curve, val_curve = [], [(0, runner.evaluate(val_batches))]
    start = time.perf_counter()
    bar = progress(range(args.steps), desc=f"{name:>5} [{engine}]", unit="step", dynamic_ncols=True)
    durations = []
    for step in bar:
        began = time.perf_counter()
        batch = sample_batch(train, args.batch_size, args.seq_len, data_gen)
        loss = runner.train_step(batch, args.lr * lr_factor(step, args.steps, warmup))  # a float: GPU waited for
        durations.append(time.perf_counter() - began)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{name} on {engine}: loss became {loss} at step {step}")
        train_curve.append((step + 1, loss))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_curve.append((step + 1, runner.evaluate(val_batches)))
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_curve[-1][1]:.3f}")
    return run_result(name, train_curve, val_curve, time.perf_counter() - start, durations) | {"engine": engine,
                                                                                               "lr": args.lr}


def model_spec(args):
    """Moonlight-mini at the demo's sequence length."""
    from ..models import get_model

    spec = get_model(args.model)
    return spec.replace(seq_length=max(spec.seq_length, args.seq_len))


def parameter_count(spec) -> int:
    from ..models import count_params

    return count_params(spec).total
