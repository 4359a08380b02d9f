"""The demo's megatron engine: Moonlight-mini as a megatron-core GPTModel, Muon through
``get_muon_optimizer`` and AdamW through megatron-core's own optimizer, on one CPU rank under the
test shim (the demo itself refuses to run megatron-core without CUDA)."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("megatron.core")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mcore_demo  # noqa: E402
from mcore_harness import run_world  # noqa: E402

STEPS = 10


def test_demo_megatron_engine_moonlight_mini_both_losses_fall():
    (results,) = run_world(mcore_demo.demo_worker, 1, STEPS)
    assert set(results) == {"muon", "adamw"}
    for name, r in results.items():
        assert r["engine"] == "megatron" and r["steps"] == STEPS, name
        # From about ln(256) = 5.55 nats; ten steps learn the byte frequencies at least.
        assert r["final_train_loss"] < r["first_train_loss"] - 0.5, name
        assert r["final_val_loss"] < r["initial_val_loss"] - 0.5, name
