"""Each optimizer's peak lr for ``muon-megatron demo``'s default run: a recorded sweep.

    python benchmarks/demo_lr_sweep.py --out benchmarks/results/demo_sweep     # the recorded sweep
    python benchmarks/demo_lr_sweep.py --out DIR --tiny                        # a smoke test, ~1 minute

Every point is the demo itself (``python -m muon_megatron.cli demo``, one optimizer per process,
``--engine deepspeed`` by default, the model's default steps, batch and sequence length, seed 0),
run one after another, each with its own ``--muon-lr`` or ``--adamw-lr``; the score is the final
validation loss. Per optimizer the sweep starts from ``--start`` lrs (4, a factor ``--factor``
apart, at most 3, from one step below the starting lr up) and adds the next lr beyond an edge for
as long as the best lr sits on that edge (up to ``--max-extra`` more), so the best lr is never at
an edge of its sweep unless the cap is hit (the table then says so).

Outputs in ``--out``: ``demo_sweep.json`` (the command, the run's flags, every point's lr, final
validation and training loss, seconds and validation curve, the best lr per optimizer and the
shared-lr check) and ``demo_sweep.md`` (the table). Points already in ``demo_sweep.json`` with the
same run flags are not run again, so an interrupted sweep resumes. ``OMP_NUM_THREADS`` defaults to
1 for the runs (set it to change): on a shared machine two threads per run lose more to waiting
than they gain, and the losses do not depend on the thread count beyond float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIMIZERS = ("muon", "adamw")
# Where each optimizer's sweep starts (one lattice, 1e-2 x 2^k, so that some lrs are run for both):
# near the lrs the same model reached its best loss with on one H200 (--engine torch, 600 steps of 8 x
# 128 bytes, of 1e-3, 3e-3, 1e-2): Muon 1e-2, AdamW 3e-3.
START = {"muon": 1e-2, "adamw": 2.5e-3}


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def lr_key(lr: float) -> str:
    return f"{lr:.4g}"


def run_point(name: str, lr: float, run_flags: list[str], workdir: pathlib.Path) -> dict:
    """One demo run of optimizer ``name`` at peak ``lr``; its summary's figures."""
    out = workdir / f"{name}_{lr_key(lr)}"
    cmd = [sys.executable, "-m", "muon_megatron.cli", "demo", "--optimizers", name, f"--{name}-lr", repr(lr),
           "--out", str(out), "--no-progress", *run_flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    began = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed for {name} at lr {lr:g}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    (r,) = summary["results"]
    return {"optimizer": name, "lr": lr, "final_val_loss": r["final_val_loss"], "final_train_loss": r["final_train_loss"],
            "seconds": r["seconds"], "wall_seconds": time.time() - began,
            "mean_step_seconds_excluding_first": r["mean_step_seconds_excluding_first"],
            "val_loss": r["val_loss"], "engine": summary["engine"], "model": summary["model"]["name"]}


def next_lr(lrs_done: dict[float, float], factor: float) -> float | None:
    """The lr to add: beyond the lowest lr if the best loss is there, beyond the highest if it is
    there, None if the best is inside."""
    lrs = sorted(lrs_done)
    best = min(lrs, key=lambda lr: lrs_done[lr])
    if best == lrs[0]:
        return lrs[0] / factor
    if best == lrs[-1]:
        return lrs[-1] * factor
    return None


def sweep(name: str, points: dict, run_flags: list[str], args, workdir: pathlib.Path, save) -> None:
    """Run ``name``'s sweep into ``points`` (lr key -> point), resuming from what is there."""
    start = args.start_lr.get(name, START[name])
    grid = [start * args.factor ** (i - (args.start - 1) // 2) for i in range(args.start)]
    done = lambda: {p["lr"]: p["final_val_loss"] for p in points.values() if p["optimizer"] == name}  # noqa: E731
    for lr in grid:
        if lr_key(lr) not in {lr_key(x) for x in done()}:
            log(f"{name}: lr {lr:.4g}")
            points[f"{name}@{lr_key(lr)}"] = run_point(name, lr, run_flags, workdir)
            log(f"{name}: lr {lr:.4g} -> final validation {points[f'{name}@{lr_key(lr)}']['final_val_loss']:.4f}")
            save()
    for _ in range(args.max_extra):
        lr = next_lr(done(), args.factor)
        if lr is None:
            return
        log(f"{name}: best at an edge, adding lr {lr:.4g}")
        points[f"{name}@{lr_key(lr)}"] = run_point(name, lr, run_flags, workdir)
        log(f"{name}: lr {lr:.4g} -> final validation {points[f'{name}@{lr_key(lr)}']['final_val_loss']:.4f}")
        save()


def best_of(points: dict, name: str) -> dict:
    mine = sorted((p for p in points.values() if p["optimizer"] == name), key=lambda p: p["lr"])
    best = min(mine, key=lambda p: p["final_val_loss"])
    return {"lr": best["lr"], "final_val_loss": best["final_val_loss"], "swept": len(mine),
            "at_edge": best is mine[0] or best is mine[-1]}


def shared_lr_check(points: dict, best: dict) -> dict:
    """Whether one lr serves both: an lr swept for both optimizers whose loss is within 1 % of
    each optimizer's best (Moonlight's setting: AdamW's lr carried over to Muon)."""
    by = {name: {lr_key(p["lr"]): p["final_val_loss"] for p in points.values() if p["optimizer"] == name}
          for name in OPTIMIZERS}
    common = sorted(set(by["muon"]) & set(by["adamw"]), key=float)
    rows = []
    for key in common:
        excess = {name: by[name][key] / best[name]["final_val_loss"] - 1 for name in OPTIMIZERS}
        rows.append({"lr": float(key), "excess_over_best": excess, "within_1_percent": max(excess.values()) <= 0.01})
    chosen = min((r for r in rows if r["within_1_percent"]), key=lambda r: max(r["excess_over_best"].values()),
                 default=None)
    return {"lrs_swept_for_both": rows, "shared_lr": chosen["lr"] if chosen else None}


def write_table(result: dict, path: pathlib.Path) -> None:
    points, best = result["points"], result["best"]
    lrs = sorted({p["lr"] for p in points.values()})
    lines = [
        "# Peak-lr sweep of `muon-megatron demo`'s default run",
        "",
        f"Run: `{result['run']}` (the model's default steps, batch and sequence length, seed 0), one optimizer per "
        f"process, `OMP_NUM_THREADS={result['omp_num_threads']}`. Measured {result['date']} on {result['machine']}.",
        "",
        "Command:",
        "",
        f"    {result['command']}",
        "",
        "Final validation loss (nats per byte) per peak lr; **bold**: each optimizer's best.",
        "",
        "| peak lr | " + " | ".join(OPTIMIZERS) + " |",
        "| --- | " + " | ".join("---" for _ in OPTIMIZERS) + " |",
    ]
    for lr in lrs:
        cells = []
        for name in OPTIMIZERS:
            p = points.get(f"{name}@{lr_key(lr)}")
            if p is None:
                cells.append("-")
            else:
                text = f"{p['final_val_loss']:.4f}"
                cells.append(f"**{text}**" if lr_key(lr) == lr_key(best[name]["lr"]) else text)
        lines.append(f"| {lr:.4g} | " + " | ".join(cells) + " |")
    lines += ["", "| optimizer | best lr | final validation loss | lrs swept | best at an edge of the sweep |",
              "| --- | --- | --- | --- | --- |"]
    for name in OPTIMIZERS:
        b = best[name]
        lines.append(f"| {name} | {b['lr']:.4g} | {b['final_val_loss']:.4f} | {b['swept']} | "
                     f"{'yes (cap reached)' if b['at_edge'] else 'no'} |")
    shared = result["shared"]["shared_lr"]
    lines += ["", ("One shared lr is within 1 % of both optima: " + f"{shared:.4g}." if shared is not None else
                   "No lr swept for both optimizers is within 1 % of both optima, so each runs at its own best lr.")]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for demo_sweep.json and demo_sweep.md")
    p.add_argument("--engine", default="deepspeed", help="the demo's --engine (default: %(default)s)")
    p.add_argument("--model", default="moonlight-mini", help="the demo's --model (default: %(default)s)")
    p.add_argument("--start", type=int, default=4, help="lrs to start each optimizer's sweep with (default: 4)")
    p.add_argument("--factor", type=float, default=2.0, help="ratio of neighbouring lrs, at most 3 (default: 2)")
    p.add_argument("--max-extra", type=int, default=4, help="lrs to add beyond an edge at most (default: 4)")
    p.add_argument("--muon-start", type=float, default=None, help="Muon's second starting lr (default 1e-2)")
    p.add_argument("--adamw-start", type=float, default=None, help="AdamW's second starting lr (default 2.5e-3)")
    p.add_argument("--optimizers", default="muon,adamw", help="which sweeps to run (default: both)")
    p.add_argument("--tiny", action="store_true", help="smoke test: 12 steps of 4 x 32 bytes, 3 start lrs, factor 3")
    p.add_argument("demo_flags", nargs="*", help="further demo flags after --, e.g. -- --steps 200")
    args = p.parse_args(argv)
    if not 1 < args.factor <= 3:
        raise SystemExit(f"--factor must be in (1, 3] (neighbouring lrs at most 3x apart), got {args.factor}")
    if args.start < 3:
        raise SystemExit(f"--start must be >= 3 so that a best lr can lie inside the sweep, got {args.start}")
    args.start_lr = {k: v for k, v in (("muon", args.muon_start), ("adamw", args.adamw_start)) if v is not None}
    run_flags = ["--engine", args.engine, "--model", args.model, *args.demo_flags]
    if args.tiny:
        run_flags += ["--steps", "12", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1",
                      "--max-bytes", "300000"]
        args.start, args.factor, args.max_extra = 3, 3.0, 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo_sweep.json"
    command = "python benchmarks/demo_lr_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("run_flags") != run_flags:
        if result:
            log(f"{path} holds a sweep of other flags ({result.get('run_flags')}); starting afresh")
        result = {"points": {}}
    result.update(command=command, run_flags=run_flags, run="muon-megatron demo " + " ".join(run_flags),
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS", "1"), date=time.strftime("%Y-%m-%d"),
                  machine=f"{os.cpu_count()} CPU cores")

    def save() -> None:
        path.write_text(json.dumps(result, indent=1))

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="demo_sweep_") as workdir:
        for name in names:
            if name not in OPTIMIZERS:
                raise SystemExit(f"--optimizers: unknown {name!r}; choose from {list(OPTIMIZERS)}")
            sweep(name, result["points"], run_flags, args, pathlib.Path(workdir), save)
    present = [n for n in OPTIMIZERS if any(p["optimizer"] == n for p in result["points"].values())]
    result["best"] = {name: best_of(result["points"], name) for name in present}
    if len(present) == 2:
        result["shared"] = shared_lr_check(result["points"], result["best"])
        save()
        write_table(result, out / "demo_sweep.md")
        log(f"wrote {path} and {out / 'demo_sweep.md'}")
    else:
        save()
        log(f"wrote {path} (the table needs both optimizers)")
    for name in present:
        b = result["best"][name]
        log(f"{name}: best lr {b['lr']:.4g} (final validation {b['final_val_loss']:.4f}, best of {b['swept']})"
            + ("; AT AN EDGE" if b["at_edge"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
