"""Bad input fails at start-up with an error naming what to change."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mcore_bad_input  # noqa: E402
from mcore_harness import run_world  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_world(mcore_bad_input.bad_input_worker, 2)


@pytest.mark.parametrize(
    "case, kind, words",
    [
        ("pattern_matches_nothing", "ValueError", ["*no_such_param*", "match no trainable parameter"]),
        ("one_d_forced_to_muon", "ValueError", ["final_layernorm.weight", "not 2-D", "--muon-adamw-params"]),
        ("cpu_offload", "ValueError", ["--optimizer-cpu-offload"]),
        ("distopt_mismatch", "ValueError", ["use_distributed_optimizer"]),
        ("not_ddp_wrapped", "ValueError", ["DistributedDataParallel"]),
        ("adam_state_into_muon_distopt_True", "OptimizerStateMismatch", ["--no-load-optim"]),
        ("adam_state_into_muon_distopt_False", "OptimizerStateMismatch", ["--no-load-optim"]),
    ],
)
def test_bad_input_raises_a_clear_error(outcomes, case, kind, words):
    for rank, out in enumerate(outcomes):
        got_kind, message = out[case]
        assert got_kind == kind, f"rank {rank}, {case}: {got_kind}: {message}"
        for word in words:
            assert word in message, f"rank {rank}, {case}: {word!r} not in {message!r}"


def test_megatron_core_outside_tested_range_is_refused(monkeypatch):
    from muon_megatron.megatron import version

    monkeypatch.setattr(version, "megatron_core_version", lambda: (0, 12))
    monkeypatch.delenv("MUON_MEGATRON_ALLOW_UNTESTED", raising=False)
    with pytest.raises(RuntimeError, match="0.12 is outside"):
        version.check_megatron_version()


def test_package_never_imports_the_cpu_shim_or_megatron_at_import_time():
    code = (
        "import sys, muon_megatron.megatron, muon_megatron.megatron.install, muon_megatron.megatron.launch; "
        "bad = [m for m in sys.modules if m == 'cpu_shim' or m.startswith('megatron') or m.startswith('deepspeed')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    for dirpath, _, files in os.walk(os.path.join(ROOT, "muon_megatron")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name)) as f:
                    assert "cpu_shim" not in f.read(), os.path.join(dirpath, name)


def test_expert_tp_without_expert_parallel_is_refused_where_megatron_core_averages_the_shards():
    """Tensor parallel 1, expert tensor parallel 2, expert parallel 1. megatron-core 0.16 keeps the
    routed experts in the dense buffer (``allreduce`` True) and its data-parallel gradient sync
    averages the two ranks' different expert shards: the adapter refuses, naming the layout and the
    fix. megatron-core 0.19 marks them expert-parallel and reduces them correctly: the adapter builds
    (that layout's exactness is test_megatron_parity's moe_expert_tp2)."""
    outcomes = run_world(mcore_bad_input.expert_tp_without_ep_worker, 2)
    for rank, out in enumerate(outcomes):
        assert out["shards_differ_before"] > 1e-3, out  # the two ranks hold different shards
        kind, message = out["error"]
        if out["reduced_as_dense"]:
            # the sync replaced each rank's gradient with the average of the two different shards'
            assert out["after_vs_mean_of_both_shards"] < 1e-6 < out["after_vs_own_shard_halved"], out
            assert kind == "ValueError", f"rank {rank}: {kind}: {message}"
            for words in ("refuses this layout", "expert tensor parallel 2", "expert parallel 1",
                          "averages the 2 different expert-tensor-parallel shards of each expert",
                          "--expert-model-parallel-size >= 2", "--expert-tensor-parallel-size 1"):
                assert words in message, f"rank {rank}: {words!r} not in {message!r}"
        else:
            # each shard keeps its own gradient, scaled for the average over data parallelism
            assert out["after_vs_own_shard_halved"] < 1e-6 < out["after_vs_mean_of_both_shards"], out
            assert kind is None, f"rank {rank}: {kind}: {message}"


@pytest.mark.parametrize("tp, etp, ep, refused", [(1, 2, 1, True), (2, 1, 1, True), (2, 2, 1, False), (1, 1, 1, False),
                                                    (1, 2, 2, False), (2, 2, 2, False), (1, 1, 4, False)])
def test_wrong_expert_layout_is_exactly_expert_tp_unlike_tp_without_ep(tp, etp, ep, refused):
    from muon_megatron.megatron.params import wrong_expert_layout

    assert (wrong_expert_layout(tp, etp, ep) is not None) == refused


@pytest.mark.parametrize("version, refused", [((0, 18), True), ((0, 19), False)])
def test_install_refuses_the_wrong_expert_layout_at_start_up_on_releases_that_train_it_wrongly(monkeypatch, version,
                                                                                              refused):
    import argparse
    import importlib

    install_module = importlib.import_module("muon_megatron.megatron.install")  # the package exports a function of that name
    from muon_megatron.megatron import version as version_module

    monkeypatch.setattr(version_module, "megatron_core_version", lambda: version)
    args = argparse.Namespace(num_experts=4, tensor_model_parallel_size=1, expert_tensor_parallel_size=2,
                              expert_model_parallel_size=1)
    if refused:
        with pytest.raises(ValueError, match="expert tensor parallel 2 and expert parallel 1"):
            install_module._refuse_wrong_expert_layout(args)
    else:
        install_module._refuse_wrong_expert_layout(args)
    args.expert_model_parallel_size = 2  # expert parallel: right on every release
    install_module._refuse_wrong_expert_layout(args)
