"""A miniature scaling law of Muon against AdamW on the Moonlight-mini family, and the
Moonlight-mini-gpu comparison at each optimizer's best lr.

    python benchmarks/scaling_law.py --out DIR --gpus 2                       # the scaling law (H200s)
    python benchmarks/scaling_law.py --out DIR --gpus 2 --resume FILE.json    # resume a partial run
    python benchmarks/scaling_law.py --out DIR --report-only --resume FILE    # fit and plot again (CPU)
    python benchmarks/scaling_law.py --mode mini-gpu --out DIR --gpus 2       # Moonlight-mini-gpu, best vs best
    python benchmarks/scaling_law.py --out DIR --tiny --gpus 2                # CPU smoke test, ~2 minutes

Scaling law (``--mode scaling``, Moonlight's figure 3 in miniature). Sizes of the Moonlight-mini
family (:func:`family_spec`: MLA, first layer dense, 8 routed experts top-2 plus 2 shared, sigmoid
router with expert bias, byte vocabulary; ``h128-l4`` is ``moonlight-mini`` itself) from 0.67 M
to 13 M parameters. Tokens are proportional to parameters: ``D = k N`` with ``N`` all parameters
and one ``k`` for every size, ``--tokens-per-param`` or, by default, the largest ``k`` (at most
20) whose runs fit ``--budget-seconds`` of device time, from a short throughput probe of each size;
``k`` is stored with the results so a resumed run keeps it. Each optimizer sweeps its peak lr per
size (3 lrs a factor 2 apart, more beyond an edge while the best lr sits on it); the best final
validation loss per size is that optimizer's point. Training FLOPs ``C = 6 D (N_matmul +
N_attn)``: ``N_matmul`` the weights a token multiplies (routed experts top-k of E, embedding
lookup excluded, output head included) and ``N_attn`` the causal attention products per token
(``L H (d_qk + d_v) (s + 1) / 2``); Newton-Schulz is not counted (the paper counts model FLOPs).

Fit: ``L = a_o C^(-b_o) + c`` per optimizer ``o`` with one irreducible loss ``c`` for both (the same
data), by least squares on ``log(L - c)`` for each ``c`` of a grid. ``flops_ratio_at_equal_loss``
is Muon's FLOPs over AdamW's at equal loss, the geometric mean over the range of losses both
fitted curves cover within their measured FLOPs (Moonlight: about 0.52); also its minimum and
maximum there, the same from a pure power law (``c = 0``) and, without any fit, from linear
interpolation of log FLOPs between each optimizer's points.

Moonlight-mini-gpu (``--mode mini-gpu``): ``moonlight-mini-gpu`` (0.47 B parameters), the same
tokens for every run (``--tokens``), each optimizer at 3 or more lrs; reports each one's best lr
and the tokens Muon's best run needs to reach AdamW's best final validation loss (linear
interpolation between evaluations).

Both modes: the training loop, data and SVD entropy of ``benchmarks/moonlight_mini_gpu.py``
(plain-torch ``MoonlightModel``; ``FusedMuon`` and fused ``torch.optim.AdamW`` on a GPU, bf16
autocast; the standard library's ``.py`` files, about 5 % held out by a hash of the path). Every
run stores its size, lr, tokens, FLOPs, final losses, validation curve and the SVD entropy per
matrix group of its final weights (``muon_megatron.analysis``), so ``analyze``'s comparison of
the best Muon and AdamW runs of the largest size needs no saved weights (``--save-weights DIR``
saves those runs' weights too, for ``muon-megatron analyze``).

Several GPUs: ``--gpus N`` starts one worker process per GPU (``CUDA_VISIBLE_DEVICES``); each
optimizer's lr sweeps over the sizes form one chain, smallest size first, and chain ``i`` runs on
worker ``i mod N`` (so 2 GPUs suffice; more stay idle). Each size's first lrs centre on the best
lr of the size before, scaled by the square root of the width ratio. Workers write
``<out>/<file>.worker<i>.json`` after every run; the main process merges them into
``<out>/scaling_law.json`` (``moonlight_mini_gpu_sweep.json``). Runs already present (in that
file or in ``--resume``) are skipped; no new run starts after ``--max-seconds`` from the start
minus its estimated length, so a command ends inside a time limit and the next one resumes.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import moonlight_mini_gpu as mmg  # noqa: E402
from muon_megatron.analysis import format_table  # noqa: E402
from muon_megatron.analysis import plot as plot_entropy  # noqa: E402
from muon_megatron.models import get_model  # noqa: E402
from muon_megatron.models.spec import MLASpec, ModelSpec, MoESpec, count_params, weights  # noqa: E402

OPTIMIZERS = ("muon", "adamw")
# name -> (hidden, layers, sequences per step)
SIZES = {
    "h96-l3": (96, 3, 32),
    "h128-l4": (128, 4, 48),
    "h192-l6": (192, 6, 96),
    "h256-l8": (256, 8, 128),
}
TINY_SIZES = {"h32-l1": (32, 1, 8), "h64-l1": (64, 1, 8), "h64-l2": (64, 2, 8), "h96-l2": (96, 2, 8)}
# The centre of the first size's lrs: issue 13's H200 sweep of moonlight-mini (600 steps, 8 x 128
# bytes) found Muon best at 1e-2 and AdamW at 3e-3 of {1e-3, 3e-3, 1e-2}.
START_LR = {"muon": 1e-2, "adamw": 3e-3}
MINI_GPU_LRS = {"muon": [1e-3, 3e-3, 1e-2], "adamw": [3e-4, 1e-3, 3e-3]}
MAX_TOKENS_PER_PARAM = 20.0


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------------------------------------
# Sizes, tokens and FLOPs.


def family_spec(name: str, hidden: int, layers: int, seq: int) -> ModelSpec:
    """A member of the Moonlight-mini family: ``moonlight-mini``'s shape rules at another width and
    depth (heads of 32 + 16 rotary dims, KV latent hidden / 4, dense FFN 4 hidden, 8 routed experts
    of 3 hidden / 4, top-2, 2 shared)."""
    if hidden % 32 or hidden < 32:
        raise ValueError(f"family_spec: hidden must be a multiple of 32, got {hidden}")
    return ModelSpec(
        name=f"moonlight-mini-{name}", num_layers=layers, hidden=hidden, dense_ffn=4 * hidden, vocab_size=256,
        attention=MLASpec(num_heads=max(1, hidden // 32), kv_lora_rank=hidden // 4, qk_nope_head_dim=32,
                          qk_rope_head_dim=16, v_head_dim=32),
        moe=MoESpec(num_experts=8, expert_ffn=3 * hidden // 4, top_k=2, num_shared_experts=2,
                    routed_scaling_factor=2.446),
        first_dense_layers=1, seq_length=seq, rope_base=50000.0,
    )


def flops_per_token(spec: ModelSpec, seq: int) -> float:
    """Training FLOPs per token: 6 x (weights a token multiplies + causal attention products)."""
    matmul = sum(w.active_numel for w in weights(spec) if w.kind != "embedding" and len(w.shape) >= 2)
    a = spec.attention
    attn = spec.num_layers * a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * (seq + 1) / 2
    return 6.0 * (matmul + attn)


# ---------------------------------------------------------------------------------------------
# The result store: runs keyed "size|optimizer|lr", merged from the workers' files.


def run_key(size: str, name: str, lr: float) -> str:
    return f"{size}|{name}|{lr:.4g}"


def load_runs(paths: list[str]) -> dict:
    runs = {}
    for path in paths:
        if path and os.path.exists(path):
            with open(path) as f:
                runs.update(json.load(f).get("runs", {}))
    return runs


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Training: one run through moonlight_mini_gpu.train.


def train_run(size: str, spec: ModelSpec, name: str, lr: float, tokens: int, batch: int, args, data, device) -> dict:
    run_args = argparse.Namespace(
        seed=args.seed, lr=lr, weight_decay=args.weight_decay, batch=batch, seq=args.seq, tokens=tokens,
        warmup_fraction=args.warmup_fraction, evals=args.evals, val_windows=args.val_windows,
        svd_per_group=args.svd_per_group, save_models=False, out=args.out,
    )
    if args.save_weights and size == args.largest:
        run_args.save_models = True
        run_args.out = os.path.join(args.save_weights, f"{size}_{name}_lr{lr:.4g}")
        os.makedirs(run_args.out, exist_ok=True)
    began = time.time()
    r = mmg.train(name, spec, data[0], data[1], run_args, device)
    per_token = flops_per_token(spec, args.seq)
    return {
        "size": size, "optimizer": name, "lr": lr, "parameters": r["parameters"],
        "active_parameters": count_params(spec).active, "tokens": r["tokens"], "steps": r["steps"],
        "batch": batch, "seq": args.seq, "flops": per_token * r["tokens"], "flops_per_token": per_token,
        "final_val_loss": r["val_curve"][-1][1], "final_train_loss": r["train_curve"][-1][1],
        "seconds": r["seconds"], "wall_seconds": time.time() - began, "val_curve": r["val_curve"],
        "svd_entropy": r["svd_entropy"],
        "weights": r["state_dict_path"], "device": str(device),
    }


def probe_rate(spec: ModelSpec, batch: int, args, data, device) -> float:
    """Training tokens per second of Muon (the slower optimizer) on ``spec``: 3 warm-up and 5 timed steps."""
    probe_args = argparse.Namespace(seed=args.seed, lr=1e-3, weight_decay=0.1, batch=batch, seq=args.seq, seconds=10.0)
    tokens = mmg.probe_tokens(spec, data[0], probe_args, device)  # 0.85 x the measured rate, whole steps
    return max(tokens, batch * args.seq) / 0.85 / probe_args.seconds


# ---------------------------------------------------------------------------------------------
# The sweeps: one chain per optimizer, sizes in order, lrs adaptive.


def lrs_to_run(done: dict[float, float], start: list[float], factor: float, max_extra: int) -> float | None:
    """The next lr of one (size, optimizer) sweep: the first start lr not yet run, else the next lr
    beyond an edge while the best is on it (at most ``max_extra`` beyond the start), else None."""
    for lr in start:
        if not any(math.isclose(lr, d, rel_tol=1e-3) for d in done):
            return lr
    if len(done) >= len(start) + max_extra:
        return None
    lrs = sorted(done)
    best = min(lrs, key=lambda lr: done[lr])
    if best == lrs[0]:
        return float(f"{lrs[0] / factor:.4g}")
    if best == lrs[-1]:
        return float(f"{lrs[-1] * factor:.4g}")
    return None


def start_lrs(centre: float, count: int, factor: float) -> list[float]:
    return [float(f"{centre * factor ** (i - (count - 1) // 2):.4g}") for i in range(count)]


def plan(args) -> list[tuple[str, ModelSpec, int, int]]:
    """(size name, spec, tokens per run, sequences per step) in order."""
    if args.mode == "mini-gpu":
        spec = get_model("moonlight-mini-gpu")
        if args.tiny:
            spec = mmg.tiny_spec(spec)
        return [(spec.name, spec.replace(seq_length=args.seq), args.tokens, args.batch)]
    out = []
    for size, (hidden, layers, batch) in args.sizes.items():
        spec = family_spec(size, hidden, layers, args.seq)
        tokens = int(args.tokens_per_param * count_params(spec).total)
        step = batch * args.seq
        out.append((size, spec, max(step, tokens // step * step), batch))
    return out


def worker(args, index: int, deadline: float) -> None:
    """Run this worker's sweeps: the optimizers ``OPTIMIZERS[i]`` with ``i mod gpus == index``,
    size by size (smallest first, so a deadline leaves whole smaller sizes behind), skipping runs
    already stored; write ``<stem>.worker<index>.json`` after every run."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    data = load_data(args)
    own_path = os.path.join(args.out, f"{args.stem}.worker{index}.json")
    runs = load_runs([*args.resume, os.path.join(args.out, args.stem + ".json"), own_path])
    mine = load_runs([own_path])
    names = [name for i, name in enumerate(OPTIMIZERS) if i % args.gpus == index]
    centre = dict(args.start_lr)
    previous_hidden = {}
    for size, spec, tokens, batch in plan(args):
        for name in names:
            if name in previous_hidden:  # the best lr of the size before, scaled by the width ratio
                centre[name] *= math.sqrt(previous_hidden[name] / spec.hidden)
            start = (args.mini_lrs[name] if args.mode == "mini-gpu"
                     else start_lrs(centre[name], args.lrs_per_size, args.factor))
            while True:
                lr = lrs_to_run(_losses(runs, size, name), start, args.factor, args.max_extra)
                if lr is None:
                    break
                estimate = _estimate_seconds(runs, size, tokens, args.rates.get(size))
                if time.time() + estimate > deadline:
                    log(f"worker {index}: {size} {name} lr {lr:.4g} (about {estimate:.0f} s) would end after "
                        "--max-seconds; stopping here: rerun with --resume to continue")
                    return
                log(f"worker {index}: {size} ({tokens / 1e6:.2f} M tokens, batch {batch} x {args.seq}) {name} "
                    f"lr {lr:.4g}")
                r = train_run(size, spec, name, lr, tokens, batch, args, data, device)
                runs[run_key(size, name, lr)] = mine[run_key(size, name, lr)] = r
                write_json(own_path, {"runs": mine})
                log(f"worker {index}: {size} {name} lr {lr:.4g}: final validation {r['final_val_loss']:.4f} "
                    f"({r['seconds']:.0f} s)")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            done = _losses(runs, size, name)
            centre[name], previous_hidden[name] = min(done, key=done.get), spec.hidden


def _losses(runs: dict, size: str, name: str) -> dict[float, float]:
    return {r["lr"]: r["final_val_loss"] for r in runs.values() if r["size"] == size and r["optimizer"] == name}


def _estimate_seconds(runs: dict, size: str, tokens: int, rate: float | None) -> float:
    """A run's expected seconds: from the slowest finished run of the size (all of it: build,
    training, evaluations, SVD entropy), else the probe's rate (plus 15 % for evaluations and 5 s
    to build), else 0 (unknown: start it)."""
    done = [r.get("wall_seconds", r["seconds"]) * tokens / r["tokens"] for r in runs.values() if r["size"] == size]
    if done:
        return max(done) + 5.0
    return tokens / rate * 1.15 + 5.0 if rate else 0.0


def load_data(args):
    train, val, info = mmg.stdlib_corpus(int(args.corpus_mb * 2**20), args.val_fraction)
    log(f"corpus: {len(train) / 1e6:.1f} M train bytes ({info['train_files']} files), {len(val) / 1e6:.2f} M "
        f"validation bytes ({info['val_files']} files)")
    return train, val, info


# ---------------------------------------------------------------------------------------------
# Fit and ratio.


def _linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = p + q x``; (p, q, sum of squared residuals)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    q = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    p = my - q * mx
    return p, q, sum((y - p - q * x) ** 2 for x, y in zip(xs, ys))


def fit_power_laws(points: dict[str, list[tuple[float, float]]], shared_floor: bool = True) -> dict:
    """``L = a_o C^(-b_o) + c`` per optimizer with one ``c`` (or ``c = 0`` without ``shared_floor``):
    for each ``c`` of a grid below the lowest loss, least squares of ``log(L - c)`` on ``log C``;
    the ``c`` with the smallest total squared residual wins."""
    low = min(loss for pts in points.values() for _, loss in pts)
    grid = [low * i / 400 for i in range(400)] if shared_floor else [0.0]
    best = None
    for c in grid:
        fits, sse = {}, 0.0
        for name, pts in points.items():
            p, q, s = _linear_fit([math.log(C) for C, _ in pts], [math.log(loss - c) for _, loss in pts])
            fits[name] = {"a": math.exp(p), "b": -q}
            sse += s
        if best is None or sse < best["sse"]:
            best = {"c": c, "sse": sse, "fits": fits}
    best["form"] = "L = a * C**(-b) + c" if shared_floor else "L = a * C**(-b)"
    best["c_at_grid_edge"] = shared_floor and best["c"] >= grid[-1]
    return best


def _flops_at(fit: dict, c: float, loss: float) -> float:
    return (fit["a"] / (loss - c)) ** (1.0 / fit["b"])


def _loss_at(fit: dict, c: float, flops: float) -> float:
    return fit["a"] * flops ** (-fit["b"]) + c


def ratio_at_equal_loss(fit: dict, points: dict, samples: int = 50) -> dict:
    """Muon's FLOPs over AdamW's at equal loss, over the losses both fitted curves reach within
    their measured FLOPs: geometric mean, minimum, maximum and the loss range."""
    c, fits = fit["c"], fit["fits"]
    spans = {}
    for name, pts in points.items():
        if fits[name]["b"] <= 0:
            return {"ratio": None, "note": f"{name}'s fitted loss does not fall with FLOPs (b = {fits[name]['b']:.3g})"}
        cs = [C for C, _ in pts]
        spans[name] = (_loss_at(fits[name], c, max(cs)), _loss_at(fits[name], c, min(cs)))
    lo, hi = max(s[0] for s in spans.values()), min(s[1] for s in spans.values())
    if not lo < hi:
        return {"ratio": None, "loss_range": [lo, hi], "note": "the fitted curves share no loss range within the "
                                                                  "measured FLOPs"}
    ratios = []
    for i in range(samples):
        loss = lo + (hi - lo) * (i + 0.5) / samples
        ratios.append(_flops_at(fits["muon"], c, loss) / _flops_at(fits["adamw"], c, loss))
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return {"ratio": geo, "min": min(ratios), "max": max(ratios), "loss_range": [lo, hi]}


def interpolated_ratio(points: dict, samples: int = 50) -> dict:
    """The same ratio without a fit: log FLOPs interpolated linearly in loss between each
    optimizer's points (sorted by FLOPs; needs losses that fall with FLOPs)."""
    curves = {}
    for name, pts in points.items():
        pts = sorted(pts)
        if any(b[1] >= a[1] for a, b in zip(pts, pts[1:])):
            return {"ratio": None, "note": f"{name}'s best losses do not fall monotonically with FLOPs"}
        curves[name] = pts
    lo = max(min(loss for _, loss in pts) for pts in curves.values())
    hi = min(max(loss for _, loss in pts) for pts in curves.values())
    if not lo < hi:
        return {"ratio": None, "note": "the measured losses of the two optimizers do not overlap"}

    def log_flops(pts, loss):
        for (c0, l0), (c1, l1) in zip(pts, pts[1:]):
            if l1 <= loss <= l0:
                t = (l0 - loss) / (l0 - l1)
                return math.log(c0) + t * (math.log(c1) - math.log(c0))
        raise ValueError(loss)

    ratios = [math.exp(log_flops(curves["muon"], lo + (hi - lo) * (i + 0.5) / samples)
                       - log_flops(curves["adamw"], lo + (hi - lo) * (i + 0.5) / samples)) for i in range(samples)]
    return {"ratio": math.exp(sum(math.log(r) for r in ratios) / samples), "min": min(ratios), "max": max(ratios),
            "loss_range": [lo, hi]}


def best_runs(runs: dict, lrs_per_size: int = 3, max_extra: int = 2) -> dict:
    """(size, optimizer) -> the run with the lowest final validation loss, the lrs run, whether
    the best sits at an edge of them and whether the sweep is complete (``lrs_per_size`` lrs run
    and the best inside them, or ``max_extra`` more run beyond an edge)."""
    best = {}
    for r in runs.values():
        key = (r["size"], r["optimizer"])
        if key not in best or r["final_val_loss"] < best[key]["final_val_loss"]:
            best[key] = r
    out = {}
    for key, r in best.items():
        lrs = sorted(x["lr"] for x in runs.values() if (x["size"], x["optimizer"]) == key)
        at_edge = len(lrs) < 3 or r["lr"] in (lrs[0], lrs[-1])
        complete = len(lrs) >= lrs_per_size and (not at_edge or len(lrs) >= lrs_per_size + max_extra)
        out[key] = dict(r, lrs_run=lrs, best_at_edge=at_edge, sweep_complete=complete)
    return out


def scaling_report(runs: dict, config: dict) -> dict:
    best = best_runs(runs, config.get("lrs_per_size", 3), config.get("max_extra", 2))
    sizes = [s for s in config["sizes"] if all((s, n) in best and best[(s, n)]["sweep_complete"] for n in OPTIMIZERS)]
    points = {n: [(best[(s, n)]["flops"], best[(s, n)]["final_val_loss"]) for s in sizes] for n in OPTIMIZERS}
    report = {
        "best": [{k: b[k] for k in ("size", "optimizer", "lr", "lrs_run", "best_at_edge", "sweep_complete", "parameters",
                                    "tokens", "flops", "final_val_loss")} for b in best.values()],
        "sizes_complete": sizes,
    }
    if len(sizes) < 3:
        report.update(flops_ratio_at_equal_loss=None,
                      note=f"{len(sizes)} sizes with both sweeps complete; a fit needs 3 or more (resume the run)")
        return report
    shared = fit_power_laws(points, shared_floor=True)
    plain = fit_power_laws(points, shared_floor=False)
    ratio = ratio_at_equal_loss(shared, points)
    report.update(
        flops_ratio_at_equal_loss=ratio["ratio"],
        flops_ratio_detail=ratio,
        fit=shared,
        flops_ratio_power_law=ratio_at_equal_loss(plain, points),
        fit_power_law=plain,
        flops_ratio_interpolated=interpolated_ratio(points),
    )
    largest = sizes[-1]
    report["svd_entropy_largest"] = {
        "size": largest,
        "runs": {n: {"lr": best[(largest, n)]["lr"], "final_val_loss": best[(largest, n)]["final_val_loss"]}
                 for n in OPTIMIZERS},
        "groups": {n: best[(largest, n)]["svd_entropy"] for n in OPTIMIZERS},
        "mean_over_groups": {n: _mean_entropy(best[(largest, n)]["svd_entropy"]) for n in OPTIMIZERS},
    }
    return report


def mini_gpu_report(runs: dict) -> dict:
    best = best_runs(runs)
    if not all(any(k[1] == n for k in best) for n in OPTIMIZERS):
        return {"note": "needs runs of both optimizers"}
    b = {n: next(r for k, r in best.items() if k[1] == n) for n in OPTIMIZERS}
    target = b["adamw"]["final_val_loss"]
    reach = {n: mmg.tokens_to_reach(b[n]["val_curve"], target) for n in OPTIMIZERS}
    ratio = reach["muon"] / reach["adamw"] if reach["muon"] is not None and reach["adamw"] else None
    return {
        "best": {n: {"lr": b[n]["lr"], "lrs_run": b[n]["lrs_run"], "best_at_edge": b[n]["best_at_edge"],
                     "final_val_loss": b[n]["final_val_loss"], "tokens": b[n]["tokens"]} for n in OPTIMIZERS},
        "adamw_best_final_val_loss": target,
        "tokens_to_reach_adamw_best_final": reach,
        "muon_over_adamw_tokens": ratio,
        "svd_entropy_mean": {n: _mean_entropy(b[n]["svd_entropy"]) for n in OPTIMIZERS},
        "svd_entropy": {n: b[n]["svd_entropy"] for n in OPTIMIZERS},
    }


def _mean_entropy(groups: dict) -> float:
    return sum(g["mean"] for g in groups.values()) / len(groups)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib optional: --report-only redraws them where it is installed).


def plot_scaling(runs: dict, report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (rerun with --report-only where it is)")
        return
    colors = {"muon": "tab:red", "adamw": "tab:blue"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    best = {(b["size"], b["optimizer"]): b for b in report["best"]}
    for r in runs.values():
        is_best = best.get((r["size"], r["optimizer"]), {}).get("lr") == r["lr"]
        ax.scatter(r["flops"], r["final_val_loss"], color=colors[r["optimizer"]], alpha=1.0 if is_best else 0.25,
                   s=40 if is_best else 15, zorder=3)
    fit = report.get("fit")
    if fit:
        for name in OPTIMIZERS:
            cs = [b["flops"] for b in report["best"] if b["optimizer"] == name]
            lo, hi = math.log(min(cs)), math.log(max(cs))
            xs = [math.exp(lo + (hi - lo) * i / 99) for i in range(100)]
            f = fit["fits"][name]
            ax.plot(xs, [_loss_at(f, fit["c"], x) for x in xs], color=colors[name],
                    label=f"{name}: {f['a']:.3g} C^-{f['b']:.3f} + {fit['c']:.3f}")
    ratio = report.get("flops_ratio_at_equal_loss")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss (nats / byte)")
    ax.set_title("best lr per size (solid), other lrs (faint)"
                 + (f"; Muon/AdamW FLOPs at equal loss {ratio:.2f}" if ratio else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    for name in OPTIMIZERS:
        for size in report["sizes_complete"]:
            pts = sorted((r["lr"], r["final_val_loss"]) for r in runs.values()
                         if r["size"] == size and r["optimizer"] == name)
            ax2.plot(*zip(*pts), "o-", color=colors[name], alpha=0.4 + 0.6 * (size == report["sizes_complete"][-1]),
                     label=f"{name} {size}")
    ax2.set_xscale("log")
    ax2.set_xlabel("peak lr")
    ax2.set_ylabel("final validation loss")
    ax2.set_title("lr sweeps per size")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_mini_gpu(runs: dict, report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    colors = {"muon": "tab:red", "adamw": "tab:blue"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sorted(runs.values(), key=lambda r: (r["optimizer"], r["lr"])):
        is_best = report["best"][r["optimizer"]]["lr"] == r["lr"]
        t, v = zip(*r["val_curve"])
        ax.plot([x / 1e6 for x in t], v, color=colors[r["optimizer"]], alpha=1.0 if is_best else 0.3,
                lw=2 if is_best else 1, label=f"{r['optimizer']} lr {r['lr']:g}")
    ax.axhline(report["adamw_best_final_val_loss"], color="gray", ls="--", lw=1, label="AdamW's best final")
    reach = report["tokens_to_reach_adamw_best_final"].get("muon")
    if reach:
        ax.axvline(reach / 1e6, color=colors["muon"], ls=":", lw=1)
    lo = min(v for r in runs.values() for _, v in r["val_curve"])
    ax.set_ylim(lo - 0.05, lo + 1.2)
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("validation loss (nats / byte)")
    ratio = report.get("muon_over_adamw_tokens")
    ax.set_title("moonlight-mini-gpu, best lr of each solid" + (f"; Muon needs {ratio:.2f}x tokens" if ratio else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", choices=("scaling", "mini-gpu"), default="scaling")
    p.add_argument("--gpus", type=int, default=1, help="worker processes, one per GPU (default 1)")
    p.add_argument("--resume", nargs="+", default=[],
                   help="results of an earlier (partial) run to continue: its JSON and/or its workers' JSON files")
    p.add_argument("--report-only", action="store_true", help="fit and plot the runs of --resume / --out, train nothing")
    p.add_argument("--max-seconds", type=float, default=540.0,
                   help="start no run that would end later than this after the start (default 540)")
    p.add_argument("--budget-seconds", type=float, default=900.0,
                   help="device seconds over all GPUs that --tokens-per-param auto aims at (default 900)")
    p.add_argument("--tokens-per-param", type=float, default=None, help="tokens per parameter (default: auto)")
    p.add_argument("--tokens", type=int, default=8_000_000, help="--mode mini-gpu: tokens per run (default 8 M)")
    p.add_argument("--batch", type=int, default=64, help="--mode mini-gpu: sequences per step (default 64)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; mini-gpu 1024)")
    p.add_argument("--lrs-per-size", type=int, default=3, help="lrs each sweep starts with (default 3)")
    p.add_argument("--factor", type=float, default=None,
                   help="ratio of neighbouring lrs, at most 3 (default 2; 3 for --mode mini-gpu, as its lrs)")
    p.add_argument("--max-extra", type=int, default=2, help="lrs beyond an edge at most (default 2)")
    p.add_argument("--muon-lr", type=float, default=None, help="centre of Muon's first size's lrs (default 1e-2)")
    p.add_argument("--adamw-lr", type=float, default=None, help="centre of AdamW's first size's lrs (default 3e-3)")
    p.add_argument("--muon-lrs", default=None, help="--mode mini-gpu: Muon's lrs, comma-separated (default 1e-3,3e-3,1e-2)")
    p.add_argument("--adamw-lrs", default=None, help="--mode mini-gpu: AdamW's lrs (default 3e-4,1e-3,3e-3)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--evals", type=int, default=12, help="validation evaluations per run (default 12)")
    p.add_argument("--val-windows", type=int, default=128, help="held-out windows per evaluation (default 128)")
    p.add_argument("--corpus-mb", type=float, default=64.0)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--svd-per-group", type=int, default=16, help="matrices per group in the SVD entropy (default 16)")
    p.add_argument("--save-weights", default=None, help="save the largest size's trained weights under this folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny sizes and tokens")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rates", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.factor is None:
        args.factor = 3.0 if args.mode == "mini-gpu" else 2.0
    if not 1 < args.factor <= 3:
        raise SystemExit(f"--factor must be in (1, 3], got {args.factor}")
    if args.lrs_per_size < 3:
        raise SystemExit(f"--lrs-per-size must be >= 3, got {args.lrs_per_size}")
    if args.gpus < 1:
        raise SystemExit(f"--gpus must be >= 1, got {args.gpus}")
    args.seq = args.seq or (1024 if args.mode == "mini-gpu" else 256)
    args.stem = "scaling_law" if args.mode == "scaling" else "moonlight_mini_gpu_sweep"
    args.sizes = dict(TINY_SIZES if args.tiny else SIZES)
    args.largest = list(args.sizes)[-1] if args.mode == "scaling" else "moonlight-mini-gpu"
    args.start_lr = {"muon": args.muon_lr or START_LR["muon"], "adamw": args.adamw_lr or START_LR["adamw"]}
    args.mini_lrs = {n: [float(x) for x in (getattr(args, f"{n}_lrs") or "").split(",") if x] or MINI_GPU_LRS[n]
                     for n in OPTIMIZERS}
    if args.mode == "mini-gpu" and min(len(v) for v in args.mini_lrs.values()) < 3:
        raise SystemExit("--muon-lrs / --adamw-lrs: give at least 3 lrs each")
    if args.tiny:
        args.seq, args.evals, args.val_windows, args.corpus_mb = 64, 6, 32, min(args.corpus_mb, 4.0)
        args.svd_per_group, args.budget_seconds = 4, 60.0
        if args.mode == "mini-gpu":
            args.tokens, args.batch = min(args.tokens, 60_000), 8
        args.factor, args.max_extra = 3.0, 1
    return args


def choose_tokens_per_param(args, config: dict) -> None:
    """Fix ``k`` (and the probe's rates): stored config first, then --tokens-per-param, else the
    largest k <= 20 whose sweeps (about lrs_per_size + 0.5 runs each) fit --budget-seconds."""
    stored = config.get("tokens_per_param")
    if stored and args.tokens_per_param not in (None, stored):
        raise SystemExit(f"--tokens-per-param {args.tokens_per_param:g}: the results to resume were run at {stored:g} "
                         "tokens per parameter; give the same, or a new --out without --resume")
    if stored:
        args.tokens_per_param, args.rates = stored, config.get("rates", {})
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    data = load_data(args)
    args.rates = {}
    for size, (hidden, layers, batch) in args.sizes.items():
        spec = family_spec(size, hidden, layers, args.seq)
        args.rates[size] = probe_rate(spec, batch, args, data, device)
        log(f"probe: {size}: {count_params(spec).total / 1e6:.2f} M parameters, {args.rates[size]:,.0f} tokens/s")
    if args.tokens_per_param is None:
        runs_per_size = 2 * (args.lrs_per_size + 0.5)
        seconds_per_k = sum(runs_per_size * count_params(family_spec(s, h, l, args.seq)).total / args.rates[s] * 1.15
                            for s, (h, l, _) in args.sizes.items())
        overhead = 2 * len(args.sizes) * (args.lrs_per_size + 0.5) * 5.0  # model build, evals, SVD per run
        args.tokens_per_param = max(0.5, min(MAX_TOKENS_PER_PARAM,
                                             (args.budget_seconds - overhead) / seconds_per_k))
        args.tokens_per_param = float(f"{args.tokens_per_param:.2g}")
        log(f"tokens per parameter: {args.tokens_per_param:g} (fits --budget-seconds {args.budget_seconds:g} "
            f"over {2 * len(args.sizes)} sweeps)")


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.time()
    os.makedirs(args.out, exist_ok=True)
    final_path = os.path.join(args.out, args.stem + ".json")
    if args.worker is not None:  # a worker process of --gpus N
        args.tokens_per_param = float(args.tokens_per_param) if args.tokens_per_param else None
        args.rates = json.loads(args.rates)
        worker(args, args.worker, args.deadline)
        return 0
    config = {}
    for path in (*args.resume, final_path):
        if os.path.exists(path):
            with open(path) as f:
                config = json.load(f).get("config") or {}
            if config:
                break
    runs = load_runs([*args.resume, final_path])
    if not args.report_only:
        if args.mode == "scaling":
            choose_tokens_per_param(args, config)
        else:
            args.rates = config.get("rates", {})
        config = {k: v for k, v in vars(args).items() if k not in ("worker", "deadline", "report_only", "resume")}
        config.update(torch=torch.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      sizes=list(args.sizes) if args.mode == "scaling" else [args.largest],
                      rule=("tokens = tokens_per_param x all parameters, the same k for every size; "
                            "FLOPs = 6 x tokens x (multiplied weights per token + causal attention products)"))
        write_json(final_path, {"config": config, "runs": runs})
        deadline = began + args.max_seconds
        if args.gpus == 1:
            worker(args, 0, deadline)
        else:
            procs = []
            for i in range(args.gpus):
                cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                       "--worker", str(i), "--deadline", repr(deadline), "--rates", json.dumps(args.rates),
                       "--tokens-per-param", repr(args.tokens_per_param or 0)]
                env = dict(os.environ)
                if torch.cuda.is_available():
                    env["CUDA_VISIBLE_DEVICES"] = str(i)
                procs.append(subprocess.Popen(cmd, env=env))
            codes = [p.wait() for p in procs]
            if any(codes):
                log(f"worker exit codes {codes}; merging what they wrote")
        runs.update(load_runs(sorted(glob.glob(os.path.join(args.out, f"{args.stem}.worker*.json")))))
    if args.mode == "scaling":
        report = scaling_report(runs, config or {"sizes": list(args.sizes)})
    else:
        report = mini_gpu_report(runs)
    result = {"config": config, **({"flops_ratio_at_equal_loss": report.get("flops_ratio_at_equal_loss")}
                                   if args.mode == "scaling" else {}), "report": report, "runs": runs}
    write_json(final_path, result)
    if args.mode == "scaling":
        plot_scaling(runs, report, os.path.join(args.out, "scaling_law.png"))
        _print_scaling(report)
        entropy = report.get("svd_entropy_largest")
        if entropy:  # analyze's side-by-side comparison of the largest size's best runs
            groups = {n: entropy["groups"][n] for n in OPTIMIZERS}
            lrs = ", ".join(f"{n} lr {entropy['runs'][n]['lr']:g}" for n in OPTIMIZERS)
            log(f"SVD entropy per matrix group, {entropy['size']}, best runs ({lrs}):\n" + format_table(groups))
            try:
                plot_entropy(groups, os.path.join(args.out, "scaling_law_svd_entropy.png"))
            except ImportError:
                pass
    else:
        if "best" in report:
            plot_mini_gpu(runs, report, os.path.join(args.out, "moonlight_mini_gpu_sweep.png"))
            lrs = ", ".join(f"{n} lr {report['best'][n]['lr']:g}" for n in OPTIMIZERS)
            log(f"SVD entropy per matrix group, best runs ({lrs}):\n" + format_table(report["svd_entropy"]))
        _print_mini(report)
    log(f"wrote {final_path} ({len(runs)} runs, {time.time() - began:.0f} s)")
    return 0


def _print_scaling(report: dict) -> None:
    for b in sorted(report["best"], key=lambda b: (b["optimizer"], b["parameters"])):
        log(f"{b['optimizer']:5s} {b['size']:8s} {b['parameters'] / 1e6:6.2f} M params {b['tokens'] / 1e6:7.2f} M tokens "
            f"{b['flops']:.3g} FLOPs  best lr {b['lr']:.4g} of {len(b['lrs_run'])}"
            f"{' (AT AN EDGE)' if b['best_at_edge'] else ''}{'' if b['sweep_complete'] else ' (sweep incomplete)'}: "
            f"final val {b['final_val_loss']:.4f}")
    ratio = report.get("flops_ratio_at_equal_loss")
    if ratio is not None:
        d = report["flops_ratio_detail"]
        log(f"Muon's FLOPs over AdamW's at equal loss: {ratio:.3f} (range {d['min']:.3f}-{d['max']:.3f} over losses "
            f"{d['loss_range'][0]:.3f}-{d['loss_range'][1]:.3f}; Moonlight: about 0.52); pure power law "
            f"{report['flops_ratio_power_law'].get('ratio')}; interpolated {report['flops_ratio_interpolated'].get('ratio')}")
    else:
        log(f"no FLOPs ratio: {report.get('note') or report.get('flops_ratio_detail', {}).get('note')}")


def _print_mini(report: dict) -> None:
    if "best" not in report:
        log(report["note"])
        return
    for n, b in report["best"].items():
        log(f"{n:5s} best lr {b['lr']:.4g} of {b['lrs_run']}{' (AT AN EDGE)' if b['best_at_edge'] else ''}: "
            f"final val {b['final_val_loss']:.4f}")
    log(f"tokens to reach AdamW's best final loss: {report['tokens_to_reach_adamw_best_final']}; "
        f"Muon / AdamW: {report['muon_over_adamw_tokens']}")


if __name__ == "__main__":
    sys.exit(main())
