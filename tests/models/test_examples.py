"""The example launch files say what the model definitions and the paper say."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import pytest

from muon_megatron.models import MOONLIGHT_16B_A3B, MOONLIGHT_MINI, read_argument_file, spec_from_megatron_args
from muon_megatron.sizing import ParallelConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIG = ROOT / "examples" / "moonlight_16b_a3b"
MINI = ROOT / "examples" / "mini"
SEQ = 8192


def _flags(path: pathlib.Path) -> dict:
    tokens = read_argument_file(str(path))
    out, i = {}, 0
    while i < len(tokens):
        values = []
        j = i + 1
        while j < len(tokens) and not tokens[j].startswith("--"):
            values.append(tokens[j])
            j += 1
        out[tokens[i]] = values
        i = j
    return out


@pytest.mark.parametrize("folder,spec", [(BIG, MOONLIGHT_16B_A3B), (MINI, MOONLIGHT_MINI)], ids=["16b", "mini"])
def test_model_args_describe_the_registered_model(folder, spec):
    found, _ = spec_from_megatron_args(read_argument_file(str(folder / "model.args")), name=spec.name)
    assert found == spec


def test_recipe_matches_moonlight():
    f = _flags(BIG / "recipe.args")
    assert f["--lr"] == ["4.2e-4"] and f["--min-lr"] == ["4.2e-5"] and f["--weight-decay"] == ["0.1"]
    assert f["--lr-decay-style"] == ["cosine"] and f["--optimizer"] == ["muon"]
    assert int(f["--lr-warmup-samples"][0]) == 2000 * 2048
    start, step, samples = map(int, f["--rampup-batch-size"])
    assert (start, start + step) == (2048, int(f["--global-batch-size"][0])) == (2048, 4096)
    assert abs(samples * SEQ - 200e9) < SEQ
    assert abs(int(f["--train-samples"][0]) * SEQ - 5.2e12) < SEQ
    assert f["--lr-decay-samples"] == f["--train-samples"]
    assert f["--muon-momentum"] == ["0.95"] and f["--muon-scale-mode"] == ["moonlight"]


@pytest.mark.parametrize("gpus", [64, 256, 1024])
def test_each_layout_fits_the_model_and_the_batch(gpus):
    f = _flags(BIG / "layouts" / f"gpus{gpus}.args")
    tp, pp, ep = (int(f[k][0]) for k in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                                          "--expert-model-parallel-size"))
    dp = gpus // (tp * pp)
    ParallelConfig(tp=tp, pp=pp, ep=ep, dp=dp).validate_for(MOONLIGHT_16B_A3B)
    assert 2048 % dp == 0  # whole micro-batches per rank at the first batch size


def test_deepspeed_stages_hold_moonlights_batches_and_optimizer():
    pytest.importorskip("muon_megatron.deepspeed.config")
    from muon_megatron.deepspeed.config import split_config

    s1, s2 = (json.loads((BIG / f"deepspeed_stage{i}.json").read_text()) for i in (1, 2))
    assert (s1["train_batch_size"], s2["train_batch_size"]) == (2048, 4096)
    assert s1["zero_optimization"]["stage"] == s2["zero_optimization"]["stage"] == 1
    for cfg in (s1, s2):
        _, muon = split_config(cfg)
        assert muon.weight_decay == 0.1 and muon.momentum == 0.95 and muon.update_scale == "moonlight"
    assert s1["scheduler"]["params"]["warmup_num_steps"] == 2000
    stage2 = s2["scheduler"]["params"]
    final_lr = s2["optimizer"]["params"]["lr"] * stage2["cos_min_ratio"]
    assert final_lr == pytest.approx(4.2e-5, rel=1e-4)
    assert stage2["total_num_steps"] * 4096 * SEQ == pytest.approx(5.0e12, rel=1e-4)
    _, mini = split_config(json.loads((MINI / "deepspeed.json").read_text()))
    assert mini.lr == 2e-3


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_torchrun_dry_run_assembles_model_recipe_and_layout(tmp_path):
    env = dict(GPUS="256", MEGATRON_LM="/opt/Megatron-LM", DATA_PATH="/data/x", CKPT_DIR=str(tmp_path), DRY_RUN="1",
               PATH="/usr/bin:/bin")
    out = subprocess.run(["bash", str(BIG / "launch_torchrun.sh")], env=env, capture_output=True, text=True, check=True)
    args = out.stdout.split("\n")
    assert args[:3] == ["-m", "muon_megatron.megatron.launch", "/opt/Megatron-LM/pretrain_gpt.py"]
    assert "--expert-model-parallel-size" in args and args[args.index("--expert-model-parallel-size") + 1] == "16"
    assert args[args.index("--moe-layer-freq") + 1].startswith("[0,1,1")
    bad = subprocess.run(["bash", str(BIG / "launch_torchrun.sh")], env=dict(env, GPUS="48"), capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "no layout for GPUS=48" in bad.stderr
