"""``muon-megatron demo``: Muon against AdamW on Moonlight-mini or a small byte-level transformer.

``--model moonlight-mini`` (the default) trains the Moonlight-family model of
:mod:`muon_megatron.models` through an engine adapter chosen by ``--engine`` (see
:mod:`.engines`); ``--model byte-lm`` the small byte-level transformer of :mod:`.byte_lm`, in
plain PyTorch. The corpus is the Python standard library's own sources (:mod:`.data`).

Both runs start from the same weights, see the same batches and use the same lr schedule and weight
decay. Each optimizer runs at its own peak lr: by default the best of a recorded sweep on the
default run (:data:`SWEPT_LR`, ``benchmarks/results/demo_sweep/``), as Moonlight compares tuned
optimizers (arXiv 2502.16982, section 3); ``--lr`` sets one lr for both, ``--muon-lr`` /
``--adamw-lr`` each one. Muon takes the hidden matrices (through
:func:`muon_megatron.muon_param_groups`, with fused QKV and gate|up weights split back into their
parts), AdamW the embeddings, head and norm gains.

Writes ``loss.png`` (train and validation loss of both runs, the point where Muon reaches AdamW's
final validation loss marked) and ``summary.json`` to ``--out`` (:mod:`.report`).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time
from dataclasses import asdict

import torch

from . import engines
from .data import load_corpus, sample_batch
from .report import report

OPTIMIZERS = ("muon", "adamw")
DEMO_MODELS = ("byte-lm", "moonlight-mini", "moonlight-mini-gpu")
# Per-model defaults of the flags left unset (None). moonlight-mini: 300 steps of 16 x 128 bytes
# (0.6 M tokens per optimizer) take both optimizers well below the byte-unigram plateau (about 2.3
# nats per byte) and finish in under 4 minutes on two CPU cores through DeepSpeed
# (benchmarks/results/demo_sweep/README.md); moonlight-mini-gpu (0.47 B parameters) is sized for
# one GPU (a few minutes on an H200).
MODEL_DEFAULTS = {
    "byte-lm": {"steps": 200, "batch_size": 16, "seq_len": 128, "d_model": 128, "layers": 4, "heads": 4},
    "moonlight-mini": {"steps": 300, "batch_size": 16, "seq_len": 128},
    "moonlight-mini-gpu": {"steps": 300, "batch_size": 16, "seq_len": 1024},
}
# Each optimizer's peak lr at a model's default run (the flags above, --engine deepspeed on the CPU):
# the best final validation loss of the sweep recorded in benchmarks/results/demo_sweep/
# (benchmarks/demo_lr_sweep.py). model -> optimizer -> (lr, number of lrs swept).
SWEPT_LR = {
    "moonlight-mini": {"muon": (2e-2, 4), "adamw": (5e-3, 4)},
}
SWEEP_SOURCE = "benchmarks/results/demo_sweep"
# Models without a recorded sweep run both optimizers at this lr.
UNSWEPT_LR = 3e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="moonlight-mini", choices=DEMO_MODELS,
                        help="moonlight-mini (MLA + MoE, through --engine; minutes on a CPU), moonlight-mini-gpu "
                             "(the same family at 0.47 B parameters, for one GPU) or byte-lm (plain torch) "
                             "(default: %(default)s)")
    parser.add_argument("--engine", default="auto", choices=("auto", "torch", "deepspeed", "megatron"),
                        help="moonlight-mini's engine; 'auto': megatron with CUDA and megatron-core, else deepspeed "
                             "if it imports, else torch (default: %(default)s)")
    parser.add_argument("--out", default="runs/demo", help="output folder for loss.png and summary.json (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per optimizer (default: 300 for moonlight-mini and moonlight-mini-gpu, "
                             "200 for byte-lm)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batches (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak lr for both Muon and AdamW (default: each optimizer's best lr from the recorded sweep "
                             "of the default run, benchmarks/results/demo_sweep; 3e-3 for models without a sweep)")
    parser.add_argument("--muon-lr", type=float, default=None, help="Muon's peak lr (overrides --lr for Muon)")
    parser.add_argument("--adamw-lr", type=float, default=None, help="AdamW's peak lr (overrides --lr for AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay for both (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per step (default: 16)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="bytes per sequence (default: 1024 for moonlight-mini-gpu, else 128)")
    parser.add_argument("--d-model", type=int, default=None, help="byte-lm's hidden size (default: 128)")
    parser.add_argument("--layers", type=int, default=None, help="byte-lm's transformer blocks (default: 4)")
    parser.add_argument("--heads", type=int, default=None, help="byte-lm's attention heads (default: 4)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="validation interval in steps (default: ceil(steps / 20), every 5 %% of the run)")
    parser.add_argument("--eval-batches", type=int, default=4, help="validation batches per evaluation (default: %(default)s)")
    parser.add_argument("--max-bytes", type=int, default=8_000_000, help="corpus size cap (default: %(default)s)")
    parser.add_argument("--optimizers", default="muon,adamw", help="comma-separated subset of muon,adamw (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="'auto' (a GPU if present), 'cpu', 'cuda', ... (default: %(default)s)")
    parser.add_argument("--ns-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="Newton-Schulz dtype; 'auto': bfloat16 (Moonlight's) on a GPU, float32 on the CPU, "
                             "where bf16 matmuls are emulated and slower (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _validate(args) -> list[str]:
    for flag, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.model != "byte-lm":
        given = [f"--{f.replace('_', '-')}" for f in ("d_model", "layers", "heads") if getattr(args, f) is not None]
        if given:
            raise SystemExit(f"{', '.join(given)} size byte-lm only; --model {args.model} has a fixed architecture "
                             "(muon_megatron.models); add --model byte-lm to size the byte-level transformer")
    if args.model == "byte-lm" and args.engine not in ("auto", "torch"):
        raise SystemExit(f"--model byte-lm runs on --engine torch only (got --engine {args.engine}); "
                         "the engine adapters run --model moonlight-mini or moonlight-mini-gpu")
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        raise SystemExit(f"--optimizers: unknown {bad or names}; choose from {list(OPTIMIZERS)}")
    for flag in ("steps", "batch_size", "seq_len", "d_model", "layers", "heads", "eval_every", "eval_batches"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1")
    if args.model == "byte-lm" and args.d_model % args.heads:
        raise SystemExit(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    for flag in ("lr", "muon_lr", "adamw_lr"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SystemExit(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    if args.eval_every is None:
        args.eval_every = math.ceil(args.steps / 20)
    return names


def resolve_lrs(args, names: list[str]) -> dict[str, dict]:
    """Each optimizer's peak lr and where it came from: ``--muon-lr`` / ``--adamw-lr``, else ``--lr``,
    else the recorded sweep of the model's default run (:data:`SWEPT_LR`), else :data:`UNSWEPT_LR`."""
    out = {}
    for name in names:
        own = getattr(args, f"{name}_lr", None)
        if own is not None:
            out[name] = {"lr": own, "source": f"--{name}-lr given"}
        elif args.lr is not None:
            out[name] = {"lr": args.lr, "source": "--lr given"}
        elif args.model in SWEPT_LR:
            lr, swept = SWEPT_LR[args.model][name]
            source = f"default from {SWEEP_SOURCE} (best of {swept})"
            changed = [f"--{f.replace('_', '-')}" for f, v in MODEL_DEFAULTS[args.model].items() if getattr(args, f) != v]
            if changed:
                source += f"; swept at the default run, this one changes {', '.join(changed)}"
            out[name] = {"lr": lr, "source": source}
        else:
            out[name] = {"lr": UNSWEPT_LR, "source": f"default {UNSWEPT_LR:g} (no sweep recorded for --model {args.model})"}
    return out


def run(args) -> int:
    began = time.perf_counter()
    names = _validate(args)
    try:
        from tqdm.auto import tqdm
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"the demo needs tqdm and matplotlib: pip install 'muon-megatron[demo]' ({err})") from None
    if args.model == "byte-lm":
        engine, reason = "torch", "byte-lm runs in plain torch"
    else:
        engine, reason = engines.choose_engine(args.engine)
        print(f"engine: {engine} ({reason})")
    if engine == "torch":
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    else:  # the engines place the model themselves: on the GPU when there is one
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device != "auto":
            print(f"note: --device {args.device} applies to --engine torch only; {engine} uses {device}")
    _resolve_ns_dtype(args, device)
    lrs = resolve_lrs(args, names)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _one_time_setup(engine)
    train, val, corpus = load_corpus(args.max_bytes)
    if min(len(train), len(val)) <= args.seq_len + 1:
        raise SystemExit(f"--max-bytes {args.max_bytes} leaves too little text for --seq-len {args.seq_len}")
    val_gen = torch.Generator().manual_seed(args.seed + 2)
    val_batches = [sample_batch(val, args.batch_size, args.seq_len, val_gen) for _ in range(args.eval_batches)]
    print(f"corpus: {corpus['files']} stdlib files from {corpus['source']} "
          f"({corpus['train_bytes']:,} train / {corpus['val_bytes']:,} validation bytes)")
    if args.model == "byte-lm":
        from .byte_lm import ByteLM, ModelConfig

        cfg = ModelConfig(d_model=args.d_model, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
        n_params = sum(p.numel() for p in ByteLM(cfg).parameters())
        spec, model = "byte-lm", {"name": "byte-lm"} | asdict(cfg) | {"parameters": n_params}
        shape = f"{cfg.layers} layers, d_model {cfg.d_model}"
        title = f"byte-level LM on the Python stdlib: {n_params / 1e6:.2f} M params, {args.steps} steps"
    else:
        spec = engines.model_spec(args)
        n_params = engines.parameter_count(spec)
        experts = spec.moe.num_experts if spec.moe else 0
        model = {"name": spec.name, "parameters": n_params, "layers": spec.num_layers, "hidden": spec.hidden,
                 "experts": experts, "seq_len": args.seq_len}
        shape = f"{spec.num_layers} layers, hidden {spec.hidden}, {experts} experts"
        title = f"{spec.name} via {engine}, Python stdlib: {n_params / 1e6:.2f} M params, {args.steps} steps"
    print(f"model: {model['name']}, {n_params:,} parameters ({shape}); device {device}; {args.steps} steps of "
          f"{args.batch_size} x {args.seq_len} bytes, validation every {args.eval_every} steps; weight decay "
          f"{args.weight_decay}; Newton-Schulz in {str(args.ns_dtype_resolved).replace('torch.', '')}")
    for name in names:
        print(f"lr {name}: {lrs[name]['lr']:g} ({lrs[name]['source']})")
    progress = (lambda it, **kw: _Quiet(it)) if args.no_progress else (lambda it, **kw: tqdm(it, **kw))
    results = [engines.train_one(name, engine, spec, args, train, val_batches, device, progress, lr=lrs[name]["lr"])
               | {"lr_source": lrs[name]["source"]} for name in names]
    return report(results, args, out, title, engine=engine, reason=reason, model=model, corpus=corpus, device=device,
                  wall_seconds=time.perf_counter() - began)


def _one_time_setup(engine: str) -> None:
    """Do the work a first run does once before the timed loops, and say so in one line: DeepSpeed's
    import, its op-compatibility probe and the one-rank process group; matplotlib's import, which
    builds its font cache on the first run of an environment. Nothing is compiled: the DeepSpeed
    runs use no JIT-built op (``torch_adam`` for AdamW, this package's Muon, the shared-memory
    all-reduce off)."""
    began, parts = time.perf_counter(), []
    if engine == "deepspeed":
        engines.start_deepspeed_world()
        parts.append("DeepSpeed import and 1-rank gloo group")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401 - builds the font cache on an environment's first run
    import matplotlib.pyplot  # noqa: F401

    parts.append("matplotlib and its font cache")
    print(f"setup before the timed loops: {', '.join(parts)} ({time.perf_counter() - began:.1f} s)")


def _resolve_ns_dtype(args, device: torch.device) -> None:
    if args.ns_dtype == "auto":
        args.ns_dtype_resolved = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        args.ns_dtype_resolved = getattr(torch, args.ns_dtype)


class _Quiet:
    """A stand-in for a tqdm bar when --no-progress is given."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        pass
