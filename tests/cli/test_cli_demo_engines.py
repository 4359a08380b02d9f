"""``muon-megatron demo --model moonlight-mini`` through the engine adapters, on the CPU.

The DeepSpeed run happens in a subprocess, as a user runs the CLI: it starts a one-process gloo
group and leaves it (and DeepSpeed's module globals) behind, which must not leak into the other
tests of this process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from muon_megatron.demo import engines as demo_engines

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Few, short steps of Moonlight-mini: 20 steps of 4 x 32 bytes learn the byte frequencies, which
# alone bring a loss that starts near ln(256) = 5.55 nats well down.
TINY = ["--steps", "20", "--batch-size", "4", "--seq-len", "32", "--eval-every", "10", "--eval-batches", "2",
        "--max-bytes", "300000", "--lr", "1e-2", "--no-progress"]


def _run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "muon_megatron.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def _check_outputs_and_falling_losses(out: pathlib.Path, engine: str) -> dict:
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == engine
    assert summary["model"]["name"] == "moonlight-mini"
    results = {r["optimizer"]: r for r in summary["results"]}
    assert set(results) == {"muon", "adamw"}
    for name, r in results.items():
        assert r["engine"] == engine
        assert len(r["train_loss"]) == 20
        assert r["final_train_loss"] < r["first_train_loss"] - 0.5, name
        assert r["final_val_loss"] < r["initial_val_loss"] - 0.5, name
        assert 0 < r["median_step_seconds"] < r["seconds"] and 0 < r["first_step_seconds"] < r["seconds"]
    return summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: DS_ACCELERATOR=cpu and gloo")
def test_demo_moonlight_mini_through_deepspeed_on_cpu_writes_outputs_and_both_losses_fall(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    proc = _run_cli(["demo", "--model", "moonlight-mini", "--engine", "deepspeed", "--out", str(out), *TINY])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "engine: deepspeed" in proc.stdout
    _check_outputs_and_falling_losses(out, "deepspeed")


def test_demo_moonlight_mini_on_torch_writes_outputs_and_both_losses_fall(tmp_path):
    from muon_megatron import cli

    out = tmp_path / "torch"
    assert cli.main(["demo", "--model", "moonlight-mini", "--engine", "torch", "--out", str(out), *TINY]) == 0
    _check_outputs_and_falling_losses(out, "torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_megatron_engine_without_cuda_exits_with_a_message_naming_the_cpu_engines():
    with pytest.raises(SystemExit, match="needs a CUDA device.*--engine deepspeed"):
        demo_engines.choose_engine("megatron")


def test_byte_lm_refuses_an_engine_adapter(tmp_path):
    from muon_megatron import cli

    with pytest.raises(SystemExit, match="byte-lm runs on --engine torch only"):
        cli.main(["demo", "--model", "byte-lm", "--engine", "deepspeed", "--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the choice made without CUDA")
def test_auto_engine_without_cuda_picks_deepspeed_when_it_imports_else_torch(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # choose_engine sets it; keep it from leaking to later tests
    engine, reason = demo_engines.choose_engine("auto")
    try:
        import deepspeed  # noqa: F401

        expected = "deepspeed"
    except Exception:  # noqa: BLE001
        expected = "torch"
    assert engine == expected
    assert reason.startswith("auto: ")


def test_moonlight_mini_refuses_byte_lm_size_flags(tmp_path):
    from muon_megatron import cli

    with pytest.raises(SystemExit, match="--d-model size byte-lm only"):
        cli.main(["demo", "--out", str(tmp_path), "--d-model", "64"])
