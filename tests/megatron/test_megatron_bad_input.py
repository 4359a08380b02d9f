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
