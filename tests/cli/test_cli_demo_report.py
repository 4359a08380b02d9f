"""What ``muon-megatron demo`` reports: the crossing point against hand-made curves, each
optimizer's lr and its source, the validation interval and the summary's keys."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from muon_megatron import cli
from muon_megatron.demo import command
from muon_megatron.demo.report import crossing_step, muon_vs_adamw, step_times

# A byte-lm run of a few steps (plain torch, seconds on a CPU).
TINY = ["--model", "byte-lm", "--steps", "12", "--batch-size", "4", "--seq-len", "32", "--d-model", "32",
        "--layers", "1", "--heads", "2", "--eval-batches", "1", "--max-bytes", "300000", "--no-progress"]


def _result(name: str, val_curve: list) -> dict:
    return {"optimizer": name, "val_loss": val_curve, "final_val_loss": val_curve[-1][1]}


def test_crossing_step_interpolates_linearly_between_the_two_evaluations_around_the_target():
    curve = [(0, 5.5), (10, 3.5), (20, 2.5), (30, 2.0), (40, 1.5)]
    # 2.3 lies between (20, 2.5) and (30, 2.0): 20 + 10 * (2.5 - 2.3) / (2.5 - 2.0) = 24 by hand.
    assert crossing_step(curve, 2.3) == pytest.approx(24.0, rel=1e-12)
    # on an evaluation point exactly: that step
    assert crossing_step(curve, 2.0) == pytest.approx(30.0, rel=1e-12)
    # below every point: never
    assert crossing_step(curve, 1.0) is None
    # at or above the first point: the first step
    assert crossing_step(curve, 6.0) == 0.0


def test_crossing_step_takes_the_first_crossing_when_the_curve_rises_again():
    curve = [(0, 4.0), (5, 3.0), (10, 1.0), (15, 2.5), (20, 1.9)]
    # First reaches 2.0 between (5, 3.0) and (10, 1.0): 5 + 5 * (3.0 - 2.0) / (3.0 - 1.0) = 7.5.
    assert crossing_step(curve, 2.0) == pytest.approx(7.5, rel=1e-12)


def test_muon_tokens_to_adamw_final_is_the_crossing_step_over_adamw_steps():
    adamw = _result("adamw", [(0, 5.5), (25, 3.0), (50, 2.4), (75, 2.2), (100, 2.1)])
    muon = _result("muon", [(0, 5.5), (25, 2.9), (50, 2.3), (75, 1.9), (100, 1.7)])
    out = muon_vs_adamw([muon, adamw])
    # Target 2.1 between Muon's (50, 2.3) and (75, 1.9): 50 + 25 * 0.2 / 0.4 = 62.5; over 100 steps.
    assert out["adamw_final_val_loss"] == 2.1
    assert out["muon_step_at_adamw_final"] == pytest.approx(62.5, rel=1e-12)
    assert out["muon_tokens_to_adamw_final"] == pytest.approx(0.625, rel=1e-12)
    assert "0.62x" in out["muon_tokens_to_adamw_final_note"] or "0.63x" in out["muon_tokens_to_adamw_final_note"]


def test_muon_tokens_to_adamw_final_is_null_with_a_sentence_when_muon_never_gets_there():
    adamw = _result("adamw", [(0, 5.5), (50, 2.0), (100, 1.6)])
    muon = _result("muon", [(0, 5.5), (50, 2.2), (100, 1.8)])
    out = muon_vs_adamw([muon, adamw])
    assert out["muon_tokens_to_adamw_final"] is None and out["muon_step_at_adamw_final"] is None
    assert out["muon_tokens_to_adamw_final_note"].startswith("Muon never reached AdamW's final validation loss 1.6000")
    alone = muon_vs_adamw([muon])
    assert alone["muon_tokens_to_adamw_final"] is None and "needs both optimizers" in alone["muon_tokens_to_adamw_final_note"]


def test_step_times_split_the_first_step_from_the_median_and_mean_of_the_rest():
    assert step_times([9.0, 1.0, 3.0, 2.0]) == {"first_step_seconds": 9.0, "median_step_seconds": 2.0,
                                               "mean_step_seconds_excluding_first": 2.0}
    assert step_times([4.0, 1.0, 1.0, 7.0])["mean_step_seconds_excluding_first"] == 3.0
    assert step_times([4.0]) == {"first_step_seconds": 4.0, "median_step_seconds": 4.0,
                                 "mean_step_seconds_excluding_first": 4.0}


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(argv)
    command._validate(args)
    return args


def test_lrs_default_to_the_recorded_sweep_and_flags_override_them_with_their_source():
    swept = command.SWEPT_LR["moonlight-mini"]
    lrs = command.resolve_lrs(_args([]), ["muon", "adamw"])
    for name in ("muon", "adamw"):
        assert lrs[name]["lr"] == swept[name][0]
        assert lrs[name]["source"] == f"default from benchmarks/results/demo_sweep (best of {swept[name][1]})"
    both = command.resolve_lrs(_args(["--lr", "2e-3"]), ["muon", "adamw"])
    assert both == {"muon": {"lr": 2e-3, "source": "--lr given"}, "adamw": {"lr": 2e-3, "source": "--lr given"}}
    own = command.resolve_lrs(_args(["--lr", "2e-3", "--muon-lr", "5e-3"]), ["muon", "adamw"])
    assert own["muon"] == {"lr": 5e-3, "source": "--muon-lr given"} and own["adamw"]["source"] == "--lr given"
    changed = command.resolve_lrs(_args(["--steps", "50"]), ["adamw"])
    assert changed["adamw"]["source"].endswith("this one changes --steps")
    unswept = command.resolve_lrs(_args(["--model", "byte-lm"]), ["muon"])
    assert unswept["muon"]["lr"] == command.UNSWEPT_LR and "no sweep recorded" in unswept["muon"]["source"]


@pytest.mark.parametrize("flag", ["--lr", "--muon-lr", "--adamw-lr"])
def test_a_non_positive_lr_is_refused_naming_its_flag(flag):
    with pytest.raises(SystemExit, match=f"{flag} must be a positive number"):
        _args([flag, "0"])


@pytest.mark.parametrize("steps, every", [(300, 15), (100, 5), (41, 3), (7, 1)])
def test_default_validation_interval_is_every_5_percent_of_the_run(steps, every):
    assert _args(["--steps", str(steps)]).eval_every == every == math.ceil(steps / 20)


def test_summary_holds_lrs_sources_crossing_point_and_step_times(tmp_path):
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *TINY, "--muon-lr", "2e-2", "--adamw-lr", "5e-3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr"] == {"muon": {"lr": 2e-2, "source": "--muon-lr given"},
                             "adamw": {"lr": 5e-3, "source": "--adamw-lr given"}}
    results = {r["optimizer"]: r for r in summary["results"]}
    for name, r in results.items():
        # validation after every ceil(12 / 20) = 1 step, plus the start
        assert [s for s, _ in r["val_loss"]] == list(range(13)), name
        assert summary["step_seconds_excluding_first"][name] == r["mean_step_seconds_excluding_first"] > 0
    # the crossing point recomputed from the saved curves, by a scan of its own
    target = results["adamw"]["val_loss"][-1][1]
    assert summary["adamw_final_val_loss"] == target
    expected = None
    curve = results["muon"]["val_loss"]
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target < l0:
            expected = s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
            break
    # Muon at 4x AdamW's lr gets there in about a fifth of the steps on this seed
    assert expected is not None
    assert summary["muon_step_at_adamw_final"] == pytest.approx(expected, rel=1e-9)
    assert summary["muon_tokens_to_adamw_final"] == pytest.approx(expected / 12, rel=1e-9)
    # the command's wall time holds both runs (and the setup, data and evaluations around them)
    assert summary["wall_seconds"] > sum(r["seconds"] for r in results.values())
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
