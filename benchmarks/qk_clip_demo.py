"""QK-Clip (Kimi K2's MuonClip) on Moonlight-mini: max attention logits with and without clipping.

    python benchmarks/qk_clip_demo.py --out benchmarks/results/qk_clip          # the committed run
    python benchmarks/qk_clip_demo.py --steps 20 --out /tmp/qk                   # a quick look

Two runs from the same initial weights, on the same batches and lr schedule as ``muon-megatron
demo`` (the Python standard library's sources as bytes, :func:`muon_megatron.demo.load_corpus`,
:func:`~muon_megatron.demo.sample_batch`, :func:`~muon_megatron.demo.lr_factor`), with
``muon_megatron.Muon`` (Moonlight settings, :func:`~muon_megatron.muon_param_groups`) on the
plain-torch Moonlight-mini (MLA, MoE; ``muon_megatron.models.torch_model``), at an lr high enough
that the attention logits grow past ``--tau``:

- ``no_clip``: max logits measured (a :class:`~muon_megatron.core.qk_clip.MaxLogitRecorder`
  around the forward pass) but never acted on;
- ``qk_clip``: the same measurement, then after every ``optimizer.step()``
  :func:`~muon_megatron.models.torch_model.qk_clip_` with ``--tau`` and ``--alpha``.

The max logit of a step is measured in that step's forward pass (before its update), the largest
over layers, heads, batch and positions; the clip after the step uses it, as megatron-core and
Kimi K2 do, so the next step's measurement can exceed ``tau`` by one update's growth.

The defaults (lr 0.1, tau 30, 100 steps of 8 x 128 bytes) were found by experiment on two CPU
cores: at the demo's lr (3e-3) the max logit stays near 2 and at 3e-2 near 20 after 60 steps, so
the lr is 30x the demo's, chosen to make the logits grow (to about 150 in 100 steps without
clipping), and tau is set below that growth; Kimi K2's tau of 100 suits its scale, not this
4-layer, 128-wide model. A few minutes per run on an idle machine (about 1 s a step).

Writes DIR/qk_clip_demo.json (config, per-step max logit overall and per layer, clipped heads,
training loss, validation loss) and DIR/qk_clip_demo.png (max logit against step for both runs
with ``tau`` marked; training and validation loss).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F

from muon_megatron.core import Muon, muon_param_groups
from muon_megatron.core.qk_clip import MaxLogitRecorder, layer_stats
from muon_megatron.demo import load_corpus, lr_factor, sample_batch
from muon_megatron.models import get_model
from muon_megatron.models.torch_model import MoonlightModel, qk_clip_

RUNS = ("no_clip", "qk_clip")


def lm_loss(model: MoonlightModel, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: MoonlightModel, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    model.train()
    return loss


def train(run: str, args, spec, train_data, val_batches) -> dict:
    torch.manual_seed(args.seed)  # the same initial weights for both runs
    model = MoonlightModel(spec)
    opt = Muon(muon_param_groups(model), lr=args.lr, weight_decay=args.weight_decay, ns_dtype=torch.float32)
    data_gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both runs
    warmup = max(1, int(args.steps * args.warmup))
    recorder = MaxLogitRecorder()
    curve = {"step": [], "lr": [], "loss": [], "max_logit": [], "clipped_heads": [], "layer_max_logit": []}
    val = [(0, evaluate(model, val_batches))]
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * lr_factor(step, args.steps, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sample_batch(train_data, args.batch_size, args.seq_len, data_gen)
        with recorder:
            loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_expert_bias_()
        if run == "qk_clip":
            stats = qk_clip_(model, recorder, tau=args.tau, alpha=args.alpha)
        else:  # measured only
            maxima = recorder.consume()
            stats = layer_stats(args.tau, maxima, {n: None for n in maxima})
        loss = float(loss.detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"{run}: loss became {loss} at step {step}")
        curve["step"].append(step + 1)
        curve["lr"].append(lr)
        curve["loss"].append(loss)
        curve["max_logit"].append(stats.max_logit_overall)
        curve["clipped_heads"].append(stats.clipped_heads_total)
        curve["layer_max_logit"].append([stats.max_logit[n] for n in sorted(stats.max_logit)])
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val.append((step + 1, evaluate(model, val_batches)))
        if args.verbose and ((step + 1) % 10 == 0 or step + 1 == args.steps):
            print(f"{run:>8} step {step + 1:4d}  loss {loss:.4f}  max logit {stats.max_logit_overall:8.2f}  "
                  f"clipped heads {stats.clipped_heads_total:2d}  ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    tail = curve["loss"][-max(1, args.steps // 10):]
    quarter = max(1, args.steps // 4)
    return {
        "run": run,
        "seconds": seconds,
        "final_train_loss": sum(tail) / len(tail),
        "final_val_loss": val[-1][1],
        "peak_max_logit": max(curve["max_logit"]),
        "final_max_logit": curve["max_logit"][-1],
        "first_step_above_tau": next((s for s, m in zip(curve["step"], curve["max_logit"]) if m > args.tau), None),
        "steps_clipped": sum(1 for c in curve["clipped_heads"] if c),
        "mean_max_logit_last_quarter": sum(curve["max_logit"][-quarter:]) / quarter,
        "layers": sorted(stats.max_logit),
        "val_loss": val,
        **curve,
    }


def smooth(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def plot(results: list[dict], args, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"no_clip": "tab:red", "qk_clip": "tab:blue"}
    labels = {"no_clip": "Muon, no clip", "qk_clip": f"Muon + QK-Clip (tau={args.tau:g})"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for r in results:
        ax1.plot(r["step"], r["max_logit"], color=colors[r["run"]], label=labels[r["run"]])
    ax1.axhline(args.tau, color="black", linestyle="--", linewidth=1, label=f"tau = {args.tau:g}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("max attention logit (all layers and heads)")
    ax1.set_title("max logit per step")
    ax1.grid(alpha=0.3)
    ax1.legend()
    window = max(1, args.steps // 40)
    for r in results:
        ax2.plot(r["step"], smooth(r["loss"], window), color=colors[r["run"]], alpha=0.6,
                 label=f"{labels[r['run']]} train")
        vs, vl = zip(*r["val_loss"])
        ax2.plot(vs, vl, "o-", color=colors[r["run"]], markersize=3, label=f"{labels[r['run']]} validation")
    settled = [x for r in results for x in r["loss"][max(1, args.steps // 5):]]
    if settled:  # leave the first fifth's steep descent off the scale
        ax2.set_ylim(min(settled) - 0.05, max(settled) + 0.05)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss (nats per byte)")
    ax2.set_title("loss")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"Moonlight-mini, Muon lr {args.lr:g}, {args.steps} steps of {args.batch_size} x {args.seq_len} bytes")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/qk_clip", help="output folder (default: %(default)s)")
    p.add_argument("--model", default="moonlight-mini", help="registered model spec (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="training steps per run (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.1, help="peak lr (default: %(default)s)")
    p.add_argument("--tau", type=float, default=30.0, help="QK-Clip threshold (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="q/k split of the factor (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and batches (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=10, help="validation interval (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (default: %(default)s)")
    p.add_argument("--max-bytes", type=int, default=8_000_000, help="corpus size cap (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's choice")
    p.add_argument("--runs", default="no_clip,qk_clip", help="comma-separated subset of no_clip,qk_clip")
    p.add_argument("--verbose", action="store_true", help="print every tenth step")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not args.runs or any(r not in RUNS for r in args.runs):
        p.error(f"--runs: choose from {RUNS}; got {args.runs}")
    for flag in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.tau > 0 or not 0 <= args.alpha <= 1:
        p.error("--tau must be > 0 and --alpha in [0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_model(args.model)
    spec = spec.replace(seq_length=max(spec.seq_length, args.seq_len))
    train_data, val_data, corpus = load_corpus(args.max_bytes)
    val_gen = torch.Generator().manual_seed(args.seed + 2)
    val_batches = [sample_batch(val_data, args.batch_size, args.seq_len, val_gen) for _ in range(args.eval_batches)]
    print(f"{spec.name}: {args.steps} steps of {args.batch_size} x {args.seq_len} bytes, lr {args.lr:g}, "
          f"tau {args.tau:g}, alpha {args.alpha:g}, torch threads {torch.get_num_threads()}")
    results = [train(run, args, spec, train_data, val_batches) for run in args.runs]
    print(f"{'run':>8} {'peak max logit':>15} {'last-quarter mean':>18} {'final max logit':>16} "
          f"{'first step > tau':>17} {'steps clipped':>14} {'train loss end':>15} {'val loss end':>13} {'seconds':>8}")
    for r in results:
        print(f"{r['run']:>8} {r['peak_max_logit']:>15.2f} {r['mean_max_logit_last_quarter']:>18.2f} "
              f"{r['final_max_logit']:>16.2f} {str(r['first_step_above_tau']):>17} {r['steps_clipped']:>14} "
              f"{r['final_train_loss']:>15.4f} {r['final_val_loss']:>13.4f} {r['seconds']:>8.1f}")
    summary = {
        "config": {k: v for k, v in vars(args).items()},
        "model": spec.name,
        "corpus": corpus,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }
    (out / "qk_clip_demo.json").write_text(json.dumps(summary, indent=1))
    plot(results, args, out / "qk_clip_demo.png")
    print(f"wrote {out / 'qk_clip_demo.json'} and {out / 'qk_clip_demo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
