"""``muon-megatron demo``: Muon against AdamW on Moonlight-mini or a small byte-level transformer.

``--model moonlight-mini`` (the default) trains the Moonlight-family model of
:mod:`muon_megatron.models` through an engine adapter chosen by ``--engine`` (see
:mod:`muon_megatron.demo_engines`); ``--model byte-lm`` the small byte-level transformer below, in
plain PyTorch.

The corpus is the Python standard library's own ``.py`` sources, read from this interpreter's
installation (never downloaded): every tenth file (sorted by name) is held out for validation.
Both runs start from the same weights, see the same batches and use the same lr schedule and weight
decay: Moonlight's claim is that AdamW's hyper-parameters carry over to Muon unchanged
(arXiv 2502.16982, section 2.2). Muon takes the hidden matrices (through
:func:`muon_megatron.muon_param_groups`, with the fused QKV and gate|up weights split back into
their parts), AdamW the embeddings, head and norm gains.

Writes ``loss.png`` (train and validation loss of both runs) and ``summary.json`` to ``--out``.
byte-lm's defaults finish in about a minute on two idle CPU cores (measured 59 s); a GPU is used
when present.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .core import FusedQKV, GateUp, Muon, muon_param_groups

OPTIMIZERS = ("muon", "adamw")
DEMO_MODELS = ("byte-lm", "moonlight-mini", "moonlight-mini-gpu")
# Per-model defaults of the flags left unset (None): Moonlight-mini's steps cost several times a
# byte-lm step on the CPU, so it runs fewer, smaller ones to finish in a few minutes;
# moonlight-mini-gpu (0.47 B parameters) is sized for one GPU (a few minutes on an H200).
MODEL_DEFAULTS = {
    "byte-lm": {"steps": 200, "batch_size": 16, "seq_len": 128, "d_model": 128, "layers": 4, "heads": 4},
    "moonlight-mini": {"steps": 100, "batch_size": 8, "seq_len": 128},
    "moonlight-mini-gpu": {"steps": 300, "batch_size": 16, "seq_len": 1024},
}


# --- corpus --------------------------------------------------------------------------------------


def stdlib_source_files() -> list[pathlib.Path]:
    """The standard library's top-level ``.py`` files of this interpreter, sorted by name."""
    candidates = [sysconfig.get_paths().get("stdlib"), os.path.dirname(os.__file__)]
    for folder in candidates:
        if folder and pathlib.Path(folder).is_dir():
            files = sorted(pathlib.Path(folder).glob("*.py"))
            if files:
                return files
    raise FileNotFoundError(
        f"no standard-library .py sources found in {candidates}; this Python installation ships none "
        "(some minimal images strip them)"
    )


def load_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train and validation byte tensors (uint8) from the stdlib sources, at most ``max_bytes`` in all."""
    files = stdlib_source_files()
    train, val, used, total = [], [], 0, 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        if total + len(data) > max_bytes:
            data = data[: max(0, max_bytes - total)]
        if not data:
            break
        (val if i % 10 == 9 else train).append(data)
        total += len(data)
        used += 1
    train_bytes, val_bytes = b"\n".join(train), b"\n".join(val)
    if not val_bytes:  # a tiny --max-bytes: hold out the tail instead
        cut = int(len(train_bytes) * 0.9)
        train_bytes, val_bytes = train_bytes[:cut], train_bytes[cut:]
    info = {"source": str(files[0].parent), "files": used, "train_bytes": len(train_bytes), "val_bytes": len(val_bytes)}
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train_bytes), as_tensor(val_bytes), info


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` bytes, as int64 tokens."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()


# --- model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    seq_len: int = 128


class Block(torch.nn.Module):
    """Pre-norm block: causal attention with a fused QKV weight in Megatron's layout (per head
    [q, k, v] rows) and a SwiGLU MLP with a fused ``gate|up`` weight."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.d_model // cfg.heads
        ffn = 4 * cfg.d_model * 2 // 3
        self.attn_norm = torch.nn.RMSNorm(cfg.d_model)
        self.qkv = torch.nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = torch.nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.mlp_norm = torch.nn.RMSNorm(cfg.d_model)
        self.fc1 = torch.nn.Linear(cfg.d_model, 2 * ffn, bias=False)
        self.fc2 = torch.nn.Linear(ffn, cfg.d_model, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(B, T, self.heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        gate, up = self.fc1(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class ByteLM(torch.nn.Module):
    """A small causal byte-level transformer: untied embedding and head, as Moonlight's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = torch.nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = torch.nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = torch.nn.RMSNorm(cfg.d_model)
        self.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                torch.nn.init.normal_(p, std=std)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def loss(self, batch):
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def make_optimizer(name: str, model: ByteLM, lr: float, weight_decay: float,
                   ns_dtype: torch.dtype = torch.bfloat16) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    cfg = model.cfg
    splits = {
        "blocks.*.qkv.weight": FusedQKV(num_query_groups=cfg.heads, q_per_group=1, head_dim=cfg.d_model // cfg.heads),
        "blocks.*.fc1.weight": GateUp(),
    }
    # The learned positions are an embedding table too: AdamW, as the token embedding.
    groups = muon_param_groups(model, adamw=["pos"], splits=splits)
    return Muon(groups, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % (the same schedule for both optimizers)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# --- training ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: ByteLM, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(float(model.loss(b)) for b in batches) / len(batches)
    model.train()
    return loss


def step_times(durations: list[float]) -> dict:
    """The first training step's seconds (one-off work: allocation, kernel selection and
    compilation) and the median of the others (the steady state), for the summary."""
    rest = sorted(durations[1:]) or durations
    return {"first_step_seconds": durations[0] if durations else float("nan"),
            "median_step_seconds": rest[len(rest) // 2] if rest else float("nan")}


def run_result(name: str, train_curve: list, val_curve: list, seconds: float, durations: list[float]) -> dict:
    """One optimizer's entry of ``summary.json``: start and end losses (the training loss averaged
    over the last tenth of the steps), wall time, step times and both curves."""
    tail = [loss for _, loss in train_curve[-max(1, len(train_curve) // 10):]]
    return {
        "optimizer": name,
        "initial_val_loss": val_curve[0][1],
        "final_val_loss": val_curve[-1][1],
        "first_train_loss": train_curve[0][1],
        "final_train_loss": sum(tail) / len(tail),
        "seconds": seconds,
        **step_times(durations),
        "train_loss": train_curve,
        "val_loss": val_curve,
    }


def train_one(name: str, args, cfg: ModelConfig, train, val_batches, device, progress) -> dict:
    torch.manual_seed(args.seed)  # same initial weights for every optimizer
    model = ByteLM(cfg).to(device)
    opt = make_optimizer(name, model, args.lr, args.weight_decay, args.ns_dtype_resolved)
    warmup = max(1, int(args.steps * args.warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, warmup))
    data_gen = torch.Generator().manual_seed(args.seed + 1)  # same batches for every optimizer
    train_curve, val_curve = [], [(0, evaluate(model, val_batches))]
    start = time.perf_counter()
    bar = progress(range(args.steps), desc=f"{name:>5}", unit="step", dynamic_ncols=True)
    durations = []
    for step in bar:
        began = time.perf_counter()
        batch = sample_batch(train, args.batch_size, cfg.seq_len, data_gen).to(device)
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        train_curve.append((step + 1, float(loss.detach())))  # float() waits for the GPU
        durations.append(time.perf_counter() - began)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_curve.append((step + 1, evaluate(model, val_batches)))
            bar.set_postfix(loss=f"{train_curve[-1][1]:.3f}", val=f"{val_curve[-1][1]:.3f}")
    return run_result(name, train_curve, val_curve, time.perf_counter() - start, durations)


def plot(results: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {"muon": "tab:blue", "adamw": "tab:orange"}
    for r in results:
        steps, losses = zip(*r["train_loss"])
        window = max(1, len(losses) // 40)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color=colors.get(r["optimizer"]), alpha=0.6, label=f"{r['optimizer']} train")
        vs, vl = zip(*r["val_loss"])
        ax.plot(vs, vl, "o-", color=colors.get(r["optimizer"]), label=f"{r['optimizer']} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
                        help="training steps per optimizer (default: 100 for moonlight-mini, 300 for moonlight-mini-gpu, "
                             "200 for byte-lm)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batches (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak lr, the same for Muon and AdamW (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay for both (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per step (default: 8 for moonlight-mini, 16 for moonlight-mini-gpu and byte-lm)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="bytes per sequence (default: 1024 for moonlight-mini-gpu, else 128)")
    parser.add_argument("--d-model", type=int, default=None, help="byte-lm's hidden size (default: 128)")
    parser.add_argument("--layers", type=int, default=None, help="byte-lm's transformer blocks (default: 4)")
    parser.add_argument("--heads", type=int, default=None, help="byte-lm's attention heads (default: 4)")
    parser.add_argument("--eval-every", type=int, default=25, help="validation interval in steps (default: %(default)s)")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation (default: %(default)s)")
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
    return names


def run(args) -> int:
    names = _validate(args)
    try:
        from tqdm.auto import tqdm
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"the demo needs tqdm and matplotlib: pip install 'muon-megatron[demo]' ({err})") from None
    if args.model != "byte-lm":
        return run_engine(args, names, tqdm)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    _resolve_ns_dtype(args, device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cfg = ModelConfig(d_model=args.d_model, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
    train, val, corpus = load_corpus(args.max_bytes)
    if min(len(train), len(val)) <= cfg.seq_len + 1:
        raise SystemExit(f"--max-bytes {args.max_bytes} leaves too little text for --seq-len {cfg.seq_len}")
    val_gen = torch.Generator().manual_seed(args.seed + 2)
    val_batches = [sample_batch(val, args.batch_size, cfg.seq_len, val_gen).to(device) for _ in range(args.eval_batches)]
    n_params = sum(p.numel() for p in ByteLM(cfg).parameters())
    print(f"corpus: {corpus['files']} stdlib files from {corpus['source']} "
          f"({corpus['train_bytes']:,} train / {corpus['val_bytes']:,} validation bytes)")
    print(f"model: {n_params:,} parameters ({cfg.layers} layers, d_model {cfg.d_model}); device {device}; "
          f"{args.steps} steps of {args.batch_size} x {cfg.seq_len} bytes; lr {args.lr}, weight decay {args.weight_decay}; "
          f"Newton-Schulz in {str(args.ns_dtype_resolved).replace('torch.', '')}")

    progress = (lambda it, **kw: _Quiet(it)) if args.no_progress else (lambda it, **kw: tqdm(it, **kw))
    results = [train_one(name, args, cfg, train, val_batches, device, progress) for name in names]

    return report(results, args, out, f"byte-level LM on the Python stdlib: {n_params / 1e6:.2f} M params, "
                  f"{args.steps} steps", engine="torch", reason="byte-lm runs in plain torch",
                  model={"name": "byte-lm"} | asdict(cfg) | {"parameters": n_params}, corpus=corpus, device=device)


def report(results: list[dict], args, out: pathlib.Path, title: str, *, engine: str, reason: str, model: dict,
           corpus: dict, device: torch.device) -> int:
    """Print the table, write ``loss.png`` and ``summary.json`` to ``out``; the exit status."""
    _print_table(results)
    plot(results, out / "loss.png", title)
    summary = {
        "config": _config_of(args),
        "engine": engine,
        "engine_reason": reason,
        "model": model,
        "corpus": corpus,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out / 'loss.png'} and {out / 'summary.json'}")
    return 0


def _config_of(args) -> dict:
    return {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
            for k, v in vars(args).items() if not callable(v)}


def _resolve_ns_dtype(args, device: torch.device) -> None:
    if args.ns_dtype == "auto":
        args.ns_dtype_resolved = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        args.ns_dtype_resolved = getattr(torch, args.ns_dtype)


def run_engine(args, names: list[str], tqdm) -> int:
    """Moonlight-mini through the engine that ``--engine`` picks (:mod:`.demo_engines`)."""
    from . import demo_engines

    engine, reason = demo_engines.choose_engine(args.engine)
    print(f"engine: {engine} ({reason})")
    if engine == "torch":
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    else:  # the engines place the model themselves: on the GPU when there is one
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device != "auto":
            print(f"note: --device {args.device} applies to --engine torch only; {engine} uses {device}")
    _resolve_ns_dtype(args, device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = demo_engines.model_spec(args)
    train, val, corpus = load_corpus(args.max_bytes)
    if min(len(train), len(val)) <= args.seq_len + 1:
        raise SystemExit(f"--max-bytes {args.max_bytes} leaves too little text for --seq-len {args.seq_len}")
    val_gen = torch.Generator().manual_seed(args.seed + 2)
    val_batches = [sample_batch(val, args.batch_size, args.seq_len, val_gen) for _ in range(args.eval_batches)]
    n_params = demo_engines.parameter_count(spec)
    print(f"corpus: {corpus['files']} stdlib files from {corpus['source']} "
          f"({corpus['train_bytes']:,} train / {corpus['val_bytes']:,} validation bytes)")
    print(f"model: {spec.name}, {n_params:,} parameters ({spec.num_layers} layers, hidden {spec.hidden}, "
          f"{spec.moe.num_experts if spec.moe else 0} experts); device {device}; {args.steps} steps of "
          f"{args.batch_size} x {args.seq_len} bytes; lr {args.lr}, weight decay {args.weight_decay}; "
          f"Newton-Schulz in {str(args.ns_dtype_resolved).replace('torch.', '')}")
    progress = (lambda it, **kw: _Quiet(it)) if args.no_progress else (lambda it, **kw: tqdm(it, **kw))
    results = [demo_engines.train_one(name, engine, spec, args, train, val_batches, device, progress)
               for name in names]
    model = {"name": spec.name, "parameters": n_params, "layers": spec.num_layers, "hidden": spec.hidden,
             "experts": spec.moe.num_experts if spec.moe else 0, "seq_len": args.seq_len}
    return report(results, args, out, f"{spec.name} via {engine}, Python stdlib: {n_params / 1e6:.2f} M params, "
                  f"{args.steps} steps", engine=engine, reason=reason, model=model, corpus=corpus, device=device)


def _print_table(results: list[dict]) -> None:
    print(f"{'optimizer':>9} {'val loss start':>15} {'val loss end':>13} {'train loss end':>15} {'seconds':>8} "
          f"{'first step ms':>14} {'median step ms':>15}")
    for r in results:
        print(f"{r['optimizer']:>9} {r['initial_val_loss']:>15.4f} {r['final_val_loss']:>13.4f} "
              f"{r['final_train_loss']:>15.4f} {r['seconds']:>8.1f} {1e3 * r['first_step_seconds']:>14.1f} "
              f"{1e3 * r['median_step_seconds']:>15.1f}")


class _Quiet:
    """A stand-in for a tqdm bar when --no-progress is given."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="muon-megatron demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
