"""Muon vs AdamW on Moonlight-mini for a fixed token budget: tokens each needs to reach AdamW's
final validation loss (Moonlight's claim: Muon needs about half).

    python benchmarks/moonlight_mini_gpu.py --out DIR                  # the H200 run (defaults)
    python benchmarks/moonlight_mini_gpu.py --tiny --out DIR           # CPU smoke test, ~1 minute
    python benchmarks/moonlight_mini_gpu.py --combine A.json B.json --out DIR   # merge two runs

Model: the plain-torch Moonlight family (``muon_megatron.models.torch_model``) at the size of a
registered spec (default ``moonlight-mini-gpu``: 12 layers, MLA, 32 experts top-4 + 2 shared,
sigmoid router with expert bias, first layer dense, 0.47 B parameters, 0.11 B active).

Data: the Python standard library's own ``.py`` sources (this interpreter's, never downloaded),
byte-level tokens (vocabulary 256). Files are split by a hash of their path: about 5 % held out
for validation, so no validation text is ever trained on. Training windows are drawn at random
from the training bytes with a fixed seed, the same windows for both optimizers.

Optimizers: ``muon_megatron.Muon`` (Moonlight settings: momentum 0.95 Nesterov, 5 NS steps,
scale 0.2 sqrt(max(A, B)), AdamW for embeddings, head and norms) and ``torch.optim.AdamW`` (betas
0.9, 0.95, eps 1e-8), both with the same lr, weight decay and schedule (linear warm-up, cosine
to lr / 10), as the paper compares them. Same initial weights (same seed).

Outputs DIR/moonlight_mini.json (config, curves, the tokens-to-target table, and the paper's
weight comparison: SVD entropy per matrix group, ``muon_megatron.analysis``),
DIR/moonlight_mini.png (validation loss against tokens, both optimizers, AdamW's final loss
marked) and DIR/moonlight_mini_svd_entropy.png. ``--only muon`` / ``--only adamw`` run one
optimizer (so two commands can share a time limit); ``--combine`` merges their JSON files into
the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from muon_megatron.analysis import analyze_state_dict, format_table  # noqa: E402
from muon_megatron.analysis import plot as plot_entropy  # noqa: E402
from muon_megatron.core import Muon, muon_param_groups  # noqa: E402
from muon_megatron.kernels import FusedMuon  # noqa: E402
from muon_megatron.models import get_model  # noqa: E402
from muon_megatron.models.spec import MLASpec, MoESpec  # noqa: E402
from muon_megatron.models.torch_model import MoonlightModel  # noqa: E402

OPTIMIZERS = ("muon", "adamw")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------------------------------------
# Data: the standard library, byte-level.


def stdlib_corpus(max_bytes: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train and validation byte tensors (uint8) from this interpreter's standard library sources.

    Files are visited in sorted order; a file goes to validation when the first 8 bytes of the
    SHA-256 of its relative path, read as a fraction, fall below ``val_fraction``. ``site-packages``
    is skipped. Stops adding files once ``max_bytes`` are collected."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    train, val, n_files = [], [], [0, 0]
    total = 0
    for path in paths:
        rel = os.path.relpath(path, root)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if not data:
            continue
        h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64
        held_out = h < val_fraction
        (val if held_out else train).append(data + b"\n\n")
        n_files[held_out] += 1
        total += len(data) + 2
        if total >= max_bytes:
            break
    to_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)  # noqa: E731
    info = dict(root=root, train_files=n_files[0], val_files=n_files[1])
    return to_tensor(train), to_tensor(val), info


def windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``[len(starts), length]`` int64 token windows of ``data``."""
    index = starts.unsqueeze(1) + torch.arange(length).unsqueeze(0)
    return data[index].long()


# ---------------------------------------------------------------------------------------------
# Training.


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``lr / 10``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(name: str, model: torch.nn.Module, args, device) -> torch.optim.Optimizer:
    if name == "muon":
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        cls = FusedMuon if device.type == "cuda" else Muon  # the fused step where a GPU runs it
        return cls(muon_param_groups(model), lr=args.lr, weight_decay=args.weight_decay, ns_dtype=ns_dtype)
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=args.weight_decay, **extra)


def loss_of(model, batch: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, val: torch.Tensor, starts: torch.Tensor, args, device, autocast: bool) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(starts), args.batch):
        batch = windows(val, starts[i : i + args.batch], args.seq + 1).to(device, non_blocking=True)
        total += float(loss_of(model, batch, autocast)) * len(batch)
    model.train()
    return total / len(starts)


def train(name: str, spec, train_data, val_data, args, device) -> dict:
    """Train one model with optimizer ``name``; return its curves and timings."""
    torch.manual_seed(args.seed)
    model = MoonlightModel(spec).to(device)
    optimizer = make_optimizer(name, model, args, device)
    autocast = device.type == "cuda"
    tokens_per_step = args.batch * args.seq
    steps = max(1, args.tokens // tokens_per_step)
    warmup = max(1, int(args.warmup_fraction * steps))
    g = torch.Generator().manual_seed(args.seed + 1)  # the same windows for both optimizers
    val_g = torch.Generator().manual_seed(args.seed + 2)
    val_starts = torch.randint(0, len(val_data) - args.seq - 1, (args.val_windows,), generator=val_g)
    eval_every = max(1, steps // args.evals)
    curve, train_curve = [], []
    smooth = None
    t0 = time.time()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(steps):
        starts = torch.randint(0, len(train_data) - args.seq - 1, (args.batch,), generator=g)
        batch = windows(train_data, starts, args.seq + 1).to(device, non_blocking=True)
        lr = lr_at(step, steps, args.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_of(model, batch, autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_expert_bias_()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: loss became {value} at step {step}")
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        done = (step + 1) * tokens_per_step
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            train_curve.append((done, smooth))
            curve.append((done, evaluate(model, val_data, val_starts, args, device, autocast)))
            sync()
            elapsed = time.time() - t0
            log(f"{name}: step {step + 1}/{steps} tokens {done / 1e6:.2f} M  train {smooth:.4f}  "
                f"val {curve[-1][1]:.4f}  lr {lr:.2e}  {done / elapsed:,.0f} tok/s  "
                f"eta {elapsed / (step + 1) * (steps - step - 1):.0f} s")
    sync()
    seconds = time.time() - t0
    entropy = analyze_state_dict(model.state_dict(), max_matrices_per_group=args.svd_per_group)
    return dict(optimizer=name, steps=steps, tokens=steps * tokens_per_step, warmup_steps=warmup,
                seconds=seconds, val_curve=curve, train_curve=train_curve,
                parameters=sum(p.numel() for p in model.parameters()), svd_entropy=entropy,
                state_dict_path=_save(model, name, args))


def probe_tokens(spec, train_data, args, device) -> int:
    """Tokens the slower optimizer (Muon) trains in ``args.seconds``: 3 warm-up and 5 timed steps."""
    torch.manual_seed(args.seed)
    model = MoonlightModel(spec).to(device)
    optimizer = make_optimizer("muon", model, args, device)
    autocast = device.type == "cuda"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(args.seed + 3)
    for k in range(8):
        if k == 3:
            sync()
            t0 = time.time()
        starts = torch.randint(0, len(train_data) - args.seq - 1, (args.batch,), generator=g)
        loss_of(model, windows(train_data, starts, args.seq + 1).to(device), autocast).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    rate = 5 * args.batch * args.seq / (time.time() - t0)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # evaluations cost about a tenth on top of training
    return int(args.seconds * rate * 0.85) // (args.batch * args.seq) * (args.batch * args.seq)


def _save(model, name: str, args) -> str | None:
    if not args.save_models:
        return None
    path = os.path.join(args.out, f"{name}_model.pt")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Report.


def tokens_to_reach(curve: list, target: float) -> float | None:
    """Tokens at which the validation curve first reaches ``target`` (linear interpolation
    between evaluations); None if it never does. Before the first evaluation counts as not yet."""
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tokens)
            t0, l0 = prev
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
        prev = (tokens, loss)
    return None


def report(runs: dict, config: dict, out: str) -> dict:
    target = runs["adamw"]["val_curve"][-1][1]
    reach = {name: tokens_to_reach(run["val_curve"], target) for name, run in runs.items()}
    ratio = reach["muon"] / reach["adamw"] if reach.get("muon") and reach.get("adamw") else None
    summary = dict(
        target_val_loss=target,
        final_val_loss={name: run["val_curve"][-1][1] for name, run in runs.items()},
        tokens_to_reach_adamw_final=reach,
        muon_over_adamw_tokens=ratio,
        seconds={name: run["seconds"] for name, run in runs.items()},
        svd_entropy_mean={name: _mean_entropy(run["svd_entropy"]) for name, run in runs.items()},
    )
    result = dict(config=config, summary=summary, runs=runs)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "moonlight_mini.json"), "w") as f:
        json.dump(result, f, indent=2)
    _plot(runs, target, reach, config, os.path.join(out, "moonlight_mini.png"))
    entropy = {name: run["svd_entropy"] for name, run in runs.items()}
    print(format_table(entropy), flush=True)
    try:
        plot_entropy(entropy, os.path.join(out, "moonlight_mini_svd_entropy.png"))
    except ImportError:
        pass
    log(f"AdamW's final validation loss {target:.4f}")
    for name in runs:
        r = reach[name]
        log(f"  {name:5s} final val {runs[name]['val_curve'][-1][1]:.4f}; reaches the target after "
            + (f"{r / 1e6:.2f} M tokens" if r is not None else "-- (never)"))
    if ratio is not None:
        log(f"  Muon needs {ratio:.2f} x AdamW's tokens (Moonlight reports about 0.5)")
    return result


def _mean_entropy(groups: dict) -> float:
    return sum(g["mean"] for g in groups.values()) / len(groups)


def _plot(runs, target, reach, config, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no PNG written")
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"muon": "tab:red", "adamw": "tab:blue"}
    for name, run in runs.items():
        t, v = zip(*run["val_curve"])
        ax.plot([x / 1e6 for x in t], v, label=f"{name} (val)", color=colors[name])
        t, v = zip(*run["train_curve"])
        ax2.plot([x / 1e6 for x in t], v, label=f"{name} (train, EMA)", color=colors[name])
        if reach.get(name):
            ax.axvline(reach[name] / 1e6, color=colors[name], ls=":", lw=1)
    ax.axhline(target, color="gray", ls="--", lw=1, label="AdamW final val")
    for a, title in ((ax, "validation loss (held-out files)"), (ax2, "training loss")):
        a.set_xlabel("tokens (M)")
        a.set_ylabel("cross-entropy (nats / byte)")
        a.set_title(title)
        a.legend()
        a.grid(alpha=0.3)
    for a, key in ((ax, "val_curve"), (ax2, "train_curve")):
        lo = min(v for run in runs.values() for _, v in run[key])
        a.set_ylim(lo - 0.05, lo + 1.0)
    fig.suptitle(f"{config['model']} ({config['parameters'] / 1e6:.3g} M params), lr {config['lr']:g}, "
                 f"wd {config['weight_decay']:g}, {config['tokens'] / 1e6:.3g} M tokens per optimizer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def tiny_spec(spec):
    """A few-second CPU stand-in of the family (for the smoke test)."""
    return spec.replace(
        name=spec.name + "-tiny", num_layers=2, hidden=48, dense_ffn=96, seq_length=64,
        attention=MLASpec(num_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        moe=MoESpec(num_experts=4, expert_ffn=32, top_k=2, num_shared_experts=1, routed_scaling_factor=2.446),
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="moonlight-mini-gpu", help="registered model spec")
    p.add_argument("--tokens", type=int, default=60_000_000, help="training tokens per optimizer")
    p.add_argument("--batch", type=int, default=64, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr for both optimizers")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--evals", type=int, default=24, help="validation evaluations per run")
    p.add_argument("--val-windows", type=int, default=256, help="held-out windows per evaluation")
    p.add_argument("--corpus-mb", type=float, default=64.0, help="stop reading sources after this many MB")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=OPTIMIZERS, help="run one optimizer (write <out>/<name>.json)")
    p.add_argument("--combine", nargs=2, metavar="JSON", help="merge the two --only runs into the report")
    p.add_argument("--save-models", action="store_true", help="save both trained models' weights (for analyze)")
    p.add_argument("--svd-per-group", type=int, default=16, help="matrices per group in the SVD-entropy comparison")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 0.2 M tokens")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--seconds", type=float, default=None,
                   help="set --tokens so each optimizer trains about this long (measured by a short probe)")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.batch, args.seq = min(args.tokens, 200_000), 16, 64
        args.evals, args.val_windows, args.corpus_mb = 8, 64, min(args.corpus_mb, 4.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.combine:
        parts = [json.load(open(path)) for path in args.combine]
        runs = {part["run"]["optimizer"]: part["run"] for part in parts}
        if set(runs) != set(OPTIMIZERS):
            raise SystemExit(f"--combine needs one muon and one adamw run, got {sorted(runs)}")
        report(runs, parts[0]["config"], args.out)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    spec = get_model(args.model)
    if args.tiny:
        spec = tiny_spec(spec)
    spec = spec.replace(seq_length=args.seq)
    train_data, val_data, corpus = stdlib_corpus(int(args.corpus_mb * 2**20), args.val_fraction)
    log(f"corpus: {len(train_data) / 1e6:.1f} M train bytes ({corpus['train_files']} files), "
        f"{len(val_data) / 1e6:.2f} M validation bytes ({corpus['val_files']} files) from {corpus['root']}")
    config = dict(vars(args), model=spec.name, spec=repr(spec), device=str(device), corpus=corpus,
                  torch=torch.__version__, gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                  parameters=sum(p.numel() for p in MoonlightModel(spec).parameters()))
    if args.seconds:
        args.tokens = probe_tokens(spec, train_data, args, device)
        config["tokens"] = args.tokens
        log(f"--seconds {args.seconds:g}: {args.tokens / 1e6:.1f} M tokens per optimizer")
    names = [args.only] if args.only else list(OPTIMIZERS)
    runs = {}
    for name in names:
        log(f"training with {name}: {args.tokens / 1e6:.1f} M tokens, batch {args.batch} x {args.seq}")
        runs[name] = train(name, spec, train_data, val_data, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.only:
        with open(os.path.join(args.out, f"{args.only}.json"), "w") as f:
            json.dump(dict(config=config, run=runs[args.only]), f, indent=2)
        log(f"wrote {os.path.join(args.out, args.only + '.json')}; merge both with --combine")
        return 0
    report(runs, config, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
