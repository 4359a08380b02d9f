"""Every example builds as Megatron-LM's ``pretrain_gpt.py`` (core_r0.19.0) builds it, with the flags
its launch script assembles: with Transformer Engine (``te.args``) and without (``local.args``).

For each example and backend, the launch script's ``DRY_RUN=1`` argument list goes through
``parse_and_validate_args`` (muon-megatron installed, as the launcher does), then
``core_transformer_config_from_args``; without Transformer Engine the model is built by the
config's ``GPTModelBuilder`` (``gpt_config_from_args``, the path ``pretrain()`` takes): for real for
Moonlight-mini (and one forward/backward), on the meta device for Moonlight-16B-A3B. Its parameters
must be exactly Moonlight's weights (``muon_megatron.models.weights``), names and shapes. The
Transformer Engine model builds only where TE is installed (not in CI).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("megatron.training.models.gpt")  # megatron-core >= 0.19 wheels carry megatron/training

from muon_megatron.models import MOONLIGHT_16B_A3B, MOONLIGHT_MINI, weights  # noqa: E402
from tests.megatron.mcore_harness import run_world  # noqa: E402

from .pretrain_gpt_workers import build_examples  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MINI = ROOT / "examples" / "mini"
BIG = ROOT / "examples" / "moonlight_16b_a3b"
BENCH = ROOT / "benchmarks" / "pretrain_gpt_mini.sh"
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
IMPLS = ("local", "transformer_engine")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts need bash")


def dry_run(script: pathlib.Path, impl: str, tmp: pathlib.Path, **env) -> list[str]:
    """The arguments ``script`` passes to pretrain_gpt.py with ``TRANSFORMER_IMPL=impl``."""
    full = dict(PATH="/usr/bin:/bin", MEGATRON_LM="/opt/Megatron-LM", DRY_RUN="1", TRANSFORMER_IMPL=impl,
                DATA_PATH=str(tmp / "data"), CKPT_DIR=str(tmp / "ckpt"), **env)
    out = subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, check=True)
    lines = out.stdout.rstrip("\n").split("\n")
    assert lines[:3] == ["-m", "muon_megatron.megatron.launch", "/opt/Megatron-LM/pretrain_gpt.py"]
    return lines[3:]


def _cases(tmp: pathlib.Path) -> dict:
    cases = {}
    for impl in IMPLS:
        build = "real" if impl == "local" or HAVE_TE else None
        cases[("mini", impl)] = dict(argv=dry_run(MINI / "launch_torchrun.sh", impl, tmp), world_size=1, build=build)
        # The same, with the allgather dispatcher: the alltoall one waits on a CUDA event (megatron-core
        # 0.19), which the CPU cannot give; everything else is the example's.
        cases[("mini-forward", impl)] = dict(
            argv=dry_run(MINI / "launch_torchrun.sh", impl, tmp, EXTRA_ARGS="--moe-token-dispatcher-type allgather"),
            world_size=1, build=build, forward=build is not None)
        for gpus in (64, 256, 1024):
            cases[("16b", impl, gpus)] = dict(argv=dry_run(BIG / "launch_torchrun.sh", impl, tmp, GPUS=str(gpus)),
                                             world_size=gpus)
        # The model on one process: the 64-GPU layout with expert parallelism 1, on the meta device.
        cases[("16b-build", impl)] = dict(
            argv=dry_run(BIG / "launch_torchrun.sh", impl, tmp, GPUS="64", EXTRA_ARGS="--expert-model-parallel-size 1"),
            world_size=1, build="meta" if build else None)
    for name, argv in benchmark_args(tmp / "bench").items():
        cases[("benchmark", name)] = dict(argv=argv, world_size=1, build="real")
    return cases


def benchmark_args(out: pathlib.Path) -> dict:
    """The argument lists benchmarks/pretrain_gpt_mini.sh gives pretrain_gpt.py (its DRY_RUN)."""
    env = dict(PATH="/usr/bin:/bin", DRY_RUN="1", MEGATRON_LM="/opt/Megatron-LM")
    subprocess.run(["bash", str(BENCH), str(out)], env=env, capture_output=True, text=True, check=True)
    args = {}
    for name in ("muon", "adam"):
        lines = (out / name / "args.txt").read_text().rstrip("\n").split("\n")
        assert lines[:3] == ["-m", "muon_megatron.megatron.launch", "/opt/Megatron-LM/pretrain_gpt.py"]
        args[name] = lines[3:]
    return args


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cases = _cases(tmp_path_factory.mktemp("examples"))
    keys = list(cases)
    (results,) = run_world(build_examples, 1, [cases[k] for k in keys], timeout=900)
    return dict(zip(keys, results))


def _ok(result: dict, what) -> dict:
    assert "error" not in result, f"{what}: {result.get('error')}"
    return result


def _expected_parameters(spec) -> dict:
    """{name: shape} of ``spec``'s weights as megatron-core names them with one tensor per expert
    (SequentialMLP's ``local_experts.<i>``)."""
    out = {}
    for w in weights(spec):
        if re.search(r"\.experts\.linear_fc\d$", w.name):
            for i in range(w.shape[0]):
                fc = w.name.rsplit(".", 1)[1]
                out[w.name.replace(f".experts.{fc}", f".experts.local_experts.{i}.{fc}") + ".weight"] = w.shape[1:]
        else:
            out[w.name] = w.shape
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("example", ["mini", "16b-64", "16b-256", "16b-1024"])
def test_example_passes_pretrain_gpts_argument_validation_and_builds_its_config(built, example, impl):
    key = ("mini", impl) if example == "mini" else ("16b", impl, int(example.split("-")[1]))
    out = _ok(built[key], key)
    assert out["optimizer"] == "muon" and out["use_distributed_optimizer"]
    assert out["transformer_impl"] == impl
    assert out["moe_grouped_gemm"] is (impl == "transformer_engine")
    assert out["apply_rope_fusion"] is False and out["qk_layernorm"] and out["multi_latent_attention"]
    if example != "mini":
        assert out["data_parallel_size"] == int(example.split("-")[1])


@pytest.mark.parametrize("example,spec", [("mini", MOONLIGHT_MINI), ("16b-build", MOONLIGHT_16B_A3B)],
                         ids=["mini", "16b"])
def test_example_without_transformer_engine_builds_exactly_moonlights_weights(built, example, spec):
    out = _ok(built[(example, "local")], example)
    assert out["attention"] == "LocalMLASelfAttention" and out["core_attention"] == "SDPACoreAttention"
    assert out["experts"] == "SequentialMLP"
    expected = _expected_parameters(spec)
    got = out["parameters"]
    assert sorted(set(expected) - set(got))[:5] == [] and sorted(set(got) - set(expected))[:5] == []
    assert {n: s for n, s in got.items() if expected[n] != s} == {}
    # Moonlight's KV-latent norm is there, and no query norm (Moonlight has no query latent).
    assert "decoder.layers.0.self_attention.kv_layernorm.weight" in got
    assert not any("q_layernorm" in n or "linear_q_proj.layer_norm" in n for n in got)


def test_mini_without_transformer_engine_forward_backward_reaches_every_weight(built):
    out = _ok(built[("mini-forward", "local")], "mini-forward")
    # Initial loss of a random model over a 256-token vocabulary: near ln(256) = 5.55.
    assert abs(out["loss"] - out["uniform_loss"]) < 1.0, out["loss"]
    bad = sorted(n for n, ok in out["grad_nonzero_finite"].items() if not ok)
    assert bad == [], bad


@pytest.mark.skipif(not HAVE_TE, reason="Transformer Engine is not installed")
def test_example_with_transformer_engine_builds_te_modules(built):
    out = _ok(built[("mini", "transformer_engine")], "mini TE")
    assert out["core_attention"].startswith("TE") and out["experts"] == "TEGroupedMLP"


def test_launch_scripts_refuse_an_unknown_transformer_impl(tmp_path):
    for script, env in ((MINI / "launch_torchrun.sh", {}), (BIG / "launch_torchrun.sh", {"GPUS": "64"})):
        full = dict(PATH="/usr/bin:/bin", MEGATRON_LM="/x", DRY_RUN="1", TRANSFORMER_IMPL="te", DATA_PATH="/d",
                    CKPT_DIR=str(tmp_path), **env)
        bad = subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True)
        assert bad.returncode == 2 and "TRANSFORMER_IMPL=te: use transformer_engine, local or auto" in bad.stderr


def test_gpu_benchmark_runs_the_mini_example_without_te_for_muon_and_adamw_alike(built, tmp_path):
    muon, adam = (_ok(built[("benchmark", name)], name) for name in ("muon", "adam"))
    assert (muon["optimizer"], adam["optimizer"]) == ("muon", "adam")
    for out in (muon, adam):
        assert out["transformer_impl"] == "local" and out["train_iters"] == 100 and out["lr_warmup_iters"] == 10
        assert out["attention"] == "LocalMLASelfAttention" and out["experts"] == "SequentialMLP"
    assert muon["parameters"] == adam["parameters"]
    args = benchmark_args(tmp_path)
    assert args["adam"] == args["muon"] + ["--optimizer", "adam"]  # the one difference; argparse keeps the last


def _megatron_log(losses, iteration_ms, optimizer_ms) -> str:
    """Lines as Megatron's training loop prints them with --log-interval 1 --timing-log-level 1."""
    out = []
    for i, (loss, ms, opt) in enumerate(zip(losses, iteration_ms, optimizer_ms), start=1):
        out.append(f" [2026-11-30 04:07:36.185410] iteration {i:8d}/{len(losses):8d} | consumed samples: {64 * i:12d} | "
                   f"elapsed time per iteration (ms): {ms:.1f} | learning rate: 1.000000E-03 | global batch size:    64 | "
                   f"lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: 1.219 | number of skipped iterations:   0 |")
        out.append("INFO:megatron.core.timers:(min, max) time across ranks (ms):")
        out.append(f"    forward-backward ...............................: ({ms - opt - 1:.2f}, {ms - opt:.2f})")
        out.append(f"    optimizer ......................................: ({opt - 1:.2f}, {opt:.2f})")
    return "\n".join(out) + "\n"


def test_gpu_benchmark_summary_reads_megatrons_log_lines(tmp_path):
    import random
    import statistics

    rng = random.Random(5)
    n = 30
    runs = {}
    for name in ("muon", "adam"):
        losses = sorted((rng.uniform(0.1, 5.5) for _ in range(n)), reverse=True)
        ms = [rng.uniform(20, 40) for _ in range(n)]
        opt = [rng.uniform(2, 10) for _ in range(n)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.txt").write_text("noise line\n" + _megatron_log(losses, ms, opt))
        runs[name] = (losses, ms, opt)
    env = dict(PATH="/usr/bin:/bin", SUMMARY_ONLY="1", ITERS=str(n), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(BENCH), str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())["runs"]
    for name, (losses, ms, opt) in runs.items():
        s = summary[name]
        steady = slice(10, None)  # iterations 11.. (warm-up and compilation excluded)
        assert s["iterations"] == n and s["first_loss"] == pytest.approx(losses[0], rel=1e-6)
        assert s["last_loss"] == pytest.approx(losses[-1], rel=1e-6)
        # the log prints iteration times to 0.1 ms and timers to 0.01 ms
        want_ms = statistics.median(round(v, 1) for v in ms[steady])
        want_opt = statistics.median(round(v, 2) for v in opt[steady])
        assert s["median_iteration_ms"] == pytest.approx(want_ms, abs=0.01)
        assert s["median_optimizer_ms"] == pytest.approx(want_opt, abs=0.01)
    assert "| muon | 30 |" in (tmp_path / "summary.md").read_text()
    # A run whose loss did not fall fails the summary (and so the benchmark).
    losses, ms, opt = runs["adam"]
    (tmp_path / "adam" / "log.txt").write_text(_megatron_log(losses[::-1], ms, opt))
    assert subprocess.run(["bash", str(BENCH), str(tmp_path)], env=env, capture_output=True).returncode == 1


@pytest.mark.parametrize("python,impl", [("/bin/true", "transformer_engine"), ("/bin/false", "local")])
def test_launch_scripts_auto_pick_te_exactly_when_python_imports_it(tmp_path, python, impl):
    """TRANSFORMER_IMPL unset: te.args when ``$PYTHON -c "import transformer_engine"`` succeeds
    (/bin/true stands for a Python with TE), local.args when it fails."""
    for script, env in ((MINI / "launch_torchrun.sh", {}), (BIG / "launch_torchrun.sh", {"GPUS": "64"})):
        full = dict(PATH="/usr/bin:/bin", MEGATRON_LM="/x", DRY_RUN="1", PYTHON=python, DATA_PATH="/d",
                    CKPT_DIR=str(tmp_path), **env)
        done = subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, check=True)
        args = done.stdout.split("\n")
        assert args[args.index("--transformer-impl") + 1] == impl
        assert ("--moe-grouped-gemm" in args) is (impl == "transformer_engine")
        assert f"TRANSFORMER_IMPL=auto: using {impl}" in done.stderr
