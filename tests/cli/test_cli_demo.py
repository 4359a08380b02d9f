"""``muon-megatron demo`` end to end (a few steps of a tiny model) and the CLI registry."""

from __future__ import annotations

import json
import sys

import pytest

from muon_megatron import cli

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

TINY = ["--steps", "30", "--batch-size", "8", "--seq-len", "32", "--d-model", "32", "--layers", "1",
        "--heads", "2", "--eval-every", "10", "--eval-batches", "2", "--max-bytes", "300000", "--lr", "1e-2",
        "--no-progress", "--model", "byte-lm"]


def test_demo_writes_plot_and_summary_and_both_losses_fall(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *TINY]) == 0
    png = out / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    results = {r["optimizer"]: r for r in summary["results"]}
    assert set(results) == {"muon", "adamw"}
    for name, r in results.items():
        assert len(r["train_loss"]) == 30
        # A byte-level model starts near ln(256) = 5.55 nats; 30 steps learn at least the byte
        # frequencies, which alone bring the loss well below that.
        assert r["final_train_loss"] < r["first_train_loss"] - 0.5, name
        assert r["final_val_loss"] < r["initial_val_loss"] - 0.5, name
        # per-step timings fit inside the run's wall time (which also holds the evaluations)
        assert 0 < r["median_step_seconds"] and 0 < r["first_step_seconds"]
        assert r["first_step_seconds"] + 29 * r["median_step_seconds"] < 2 * r["seconds"]
    assert summary["corpus"]["files"] > 0 and summary["corpus"]["val_bytes"] > 0
    printed = capsys.readouterr().out
    assert "muon" in printed and "adamw" in printed and "summary.json" in printed


def test_demo_same_seed_gives_same_losses(tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / str(i)
        args = ["demo", "--out", str(out), *TINY, "--steps", "5", "--eval-every", "5", "--optimizers", "muon"]
        assert cli.main(args) == 0
        runs.append(json.loads((out / "summary.json").read_text())["results"][0]["train_loss"])
    assert runs[0] == runs[1]


def test_demo_rejects_unknown_optimizer(tmp_path):
    with pytest.raises(SystemExit, match="sgd"):
        cli.main(["demo", "--out", str(tmp_path), "--optimizers", "sgd"])


def test_help_lists_registered_subcommands_without_importing_them(capsys, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("muon_megatron.demo")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in printed
    assert not any(m.startswith("muon_megatron.demo") for m in sys.modules)


def test_every_registered_subcommand_has_its_functions():
    for name, entry in cli.SUBCOMMANDS.items():
        assert callable(entry.function("add_arguments")), name
        assert callable(entry.function("run")), name


def test_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2

