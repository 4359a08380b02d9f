"""What the demo reports: one entry per optimizer, the table, ``loss.png`` and ``summary.json``.

Besides each optimizer's losses, lr (and where it came from) and step times, the summary says how
soon Muon reached AdamW's final validation loss: ``muon_tokens_to_adamw_final`` is the step at
which Muon's validation curve first reaches that loss (linear interpolation between evaluations)
divided by AdamW's steps. Both runs take the same tokens per step, so it is also the ratio of
tokens (Moonlight reports about half the compute for the same loss, arXiv 2502.16982).
"""

from __future__ import annotations

import json
import pathlib
import platform

import torch


def step_times(durations: list[float]) -> dict:
    """The first training step's seconds (one-off work: allocation, kernel selection and
    compilation), the median of the others (the steady state) and their mean, for the summary.
    With a single step, that step stands for the rest."""
    rest = sorted(durations[1:]) or durations
    return {"first_step_seconds": durations[0] if durations else float("nan"),
            "median_step_seconds": rest[len(rest) // 2] if rest else float("nan"),
            "mean_step_seconds_excluding_first": sum(rest) / len(rest) if rest else float("nan")}


def crossing_step(curve: list, target: float) -> float | None:
    """The first step at which the validation ``curve`` (``[(step, loss), ...]`` in step order)
    reaches ``target`` (loss <= target), interpolated linearly between the two evaluations around
    it; None if it never does. A curve already at or below ``target`` at its first point gives that
    point's step."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            step0, loss0 = previous
            return step0 + (loss0 - target) / (loss0 - loss) * (step - step0)
        previous = (step, loss)
    return None


def muon_vs_adamw(results: list[dict]) -> dict:
    """The summary's comparison: AdamW's final validation loss, the (interpolated) step at which
    Muon's validation curve reached it, that step as a fraction of AdamW's steps
    (``muon_tokens_to_adamw_final``; None when Muon never reached it or one run is missing) and a
    sentence saying which."""
    by_name = {r["optimizer"]: r for r in results}
    if not {"muon", "adamw"} <= set(by_name):
        return {"adamw_final_val_loss": None, "muon_step_at_adamw_final": None, "muon_tokens_to_adamw_final": None,
                "muon_tokens_to_adamw_final_note": "needs both optimizers (--optimizers muon,adamw)"}
    adamw_steps, target = by_name["adamw"]["val_loss"][-1]
    step = crossing_step(by_name["muon"]["val_loss"], target)
    if step is None:
        note = (f"Muon never reached AdamW's final validation loss {target:.4f} in {by_name['muon']['val_loss'][-1][0]} "
                f"steps (its own final: {by_name['muon']['final_val_loss']:.4f})")
        fraction = None
    else:
        fraction = step / adamw_steps
        note = (f"Muon reached AdamW's final validation loss {target:.4f} at step {step:.1f}, "
                f"{fraction:.2f}x AdamW's {adamw_steps} steps (and tokens)")
    return {"adamw_final_val_loss": target, "muon_step_at_adamw_final": step, "muon_tokens_to_adamw_final": fraction,
            "muon_tokens_to_adamw_final_note": note}


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


def plot(results: list[dict], path: pathlib.Path, title: str, comparison: dict | None = None) -> None:
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
        lr = f", lr {r['lr']:g}" if "lr" in r else ""
        ax.plot(vs, vl, "o-", ms=3, color=colors.get(r["optimizer"]), label=f"{r['optimizer']} validation{lr}")
    if comparison and comparison.get("adamw_final_val_loss") is not None:
        target, step = comparison["adamw_final_val_loss"], comparison["muon_step_at_adamw_final"]
        ax.axhline(target, color="gray", ls="--", lw=1, label="AdamW's final validation loss")
        if step is not None:
            ax.axvline(step, color=colors["muon"], ls=":", lw=1)
            ax.plot([step], [target], "*", ms=14, color=colors["muon"], zorder=5,
                    label=f"Muon reaches it: step {step:.0f}, {comparison['muon_tokens_to_adamw_final']:.2f}x tokens")
    # Show the part of the run where the curves differ: from the losses after the first tenth down.
    late = [loss for r in results for s, loss in r["val_loss"] if s >= 0.1 * r["val_loss"][-1][0] and s > 0]
    low = min(loss for r in results for _, loss in r["val_loss"])
    if late:
        ax.set_ylim(low - 0.05, max(late) + 0.1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(results: list[dict], args, out: pathlib.Path, title: str, *, engine: str, reason: str, model: dict,
           corpus: dict, device: torch.device, wall_seconds: float | None = None) -> int:
    """Print the table, write ``loss.png`` and ``summary.json`` to ``out``; the exit status.
    ``wall_seconds``: the command's time so far (setup, data, both runs), without the interpreter's
    imports before it."""
    comparison = muon_vs_adamw(results)
    _print_table(results)
    print(comparison["muon_tokens_to_adamw_final_note"])
    plot(results, out / "loss.png", title, comparison)
    summary = {
        "config": _config_of(args),
        "engine": engine,
        "engine_reason": reason,
        "model": model,
        "corpus": corpus,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "lr": {r["optimizer"]: {"lr": r.get("lr"), "source": r.get("lr_source")} for r in results},
        **comparison,
        "step_seconds_excluding_first": {r["optimizer"]: r["mean_step_seconds_excluding_first"] for r in results},
        "wall_seconds": wall_seconds,
        "results": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    took = f" ({wall_seconds:.0f} s since the demo began, after the imports)" if wall_seconds is not None else ""
    print(f"wrote {out / 'loss.png'} and {out / 'summary.json'}{took}")
    return 0


def _config_of(args) -> dict:
    return {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
            for k, v in vars(args).items() if not callable(v)}


def _print_table(results: list[dict]) -> None:
    print(f"{'optimizer':>9} {'peak lr':>8} {'val loss start':>15} {'val loss end':>13} {'train loss end':>15} "
          f"{'seconds':>8} {'first step ms':>14} {'ms/step after first':>20}")
    for r in results:
        print(f"{r['optimizer']:>9} {r.get('lr', float('nan')):>8.2g} {r['initial_val_loss']:>15.4f} "
              f"{r['final_val_loss']:>13.4f} {r['final_train_loss']:>15.4f} {r['seconds']:>8.1f} "
              f"{1e3 * r['first_step_seconds']:>14.1f} {1e3 * r['mean_step_seconds_excluding_first']:>20.1f}")
