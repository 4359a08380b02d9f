"""End to end: megatron-core 0.19's own QK-Clip flags in Megatron's ``pretrain()`` loop with
``--optimizer muon`` (bf16, distributed optimizer, overlapped param all-gather, two CPU ranks):
the clip happens in our optimizer, megatron-core's own clip stays off (on the CPU it would need
Transformer Engine), and training proceeds."""

from __future__ import annotations

import math
import os
import sys

import pytest

pytest.importorskip("megatron.training.training")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mcore_qk_clip as mq  # noqa: E402
from mcore_harness import run_world  # noqa: E402

FLAGS = ["--use-distributed-optimizer", "--bf16", "--overlap-grad-reduce", "--overlap-param-gather",
         "--train-iters", "6"]
TAU = 0.05  # the tiny model's max logits are ~0.03-0.1 at initialisation: some heads clip


def test_pretrain_with_megatron_cores_qk_clip_flags_clips_in_the_muon_step():
    results = run_world(mq.pretrain_qk_clip_worker, 2, FLAGS + ["--qk-clip", "--qk-clip-threshold", str(TAU),
                                                                "--qk-clip-alpha", "0.5"])
    for out in results:
        assert out["optimizer"] == "muon" and out["megatron_qk_clip"] is False
        assert len(out["qk"]) == 6 and all(tau == TAU for tau, _, _ in out["qk"])
        assert sum(clipped for _, clipped, _ in out["qk"]) > 0, out["qk"]
        assert all(math.isfinite(v) for v in out["losses"])
    assert results[0]["qk"] == results[1]["qk"]  # reduced over the data-parallel ranks: the same everywhere
