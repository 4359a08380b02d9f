"""End to end: Megatron's own pretrain() loop with --optimizer muon (megatron-core 0.19's
megatron/training), on two CPU ranks: the plugin is installed, the distributed optimizer stays on
(with bf16 and the overlapped param all-gather), our optimizer is the one built, and the loss falls."""

from __future__ import annotations

import math
import os
import sys

import pytest

pytest.importorskip("megatron.training.training")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mcore_pretrain  # noqa: E402
from mcore_harness import run_world  # noqa: E402


FLAGS = ["--use-distributed-optimizer", "--bf16", "--overlap-grad-reduce", "--overlap-param-gather",
         "--ckpt-format", "torch_dist"]


@pytest.fixture(scope="module")
def uninterrupted():
    return run_world(mcore_pretrain.pretrain_worker, 2, FLAGS)


def test_pretrain_with_optimizer_muon_bf16_distributed_optimizer_overlap_loss_falls(uninterrupted):
    for out in uninterrupted:
        assert out["optimizer"] == "muon"
        assert out["use_distributed_optimizer"] and out["overlap_param_gather"]
        assert out["wrappers"] == [("MuonDistributedOptimizer", "MegatronMuon")]
        losses = out["losses"]
        assert len(losses) == 12
        assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


def test_pretrain_resumes_from_its_own_torch_dist_checkpoint_like_an_uninterrupted_run(uninterrupted, tmp_path):
    """Megatron's own save/load (--save/--load, torch_dist) with the Muon optimizer: six iterations
    with the matrix-aligned buffer layout (--muon-layout aligned), save; a new run with Megatron's
    default layout loads and trains six more. Both halves follow the uninterrupted run (default
    layout) within bf16 rounding: the buffer layout changes the bf16 rounding of the first half
    (measured 1.5e-4 relative), and the checkpoint does not depend on it."""
    ckpt = str(tmp_path / "ckpt")
    first = run_world(
        mcore_pretrain.pretrain_worker, 2,
        FLAGS + ["--muon-layout", "aligned", "--train-iters", "6", "--save", ckpt, "--save-interval", "6"],
    )
    # The first run was told to stop at 6 iterations: its scheduler state differs only in the total.
    # --no-load-rng: the CPU shim keeps no CUDA RNG tracker states (dropout is 0 anyway).
    resumed = run_world(
        mcore_pretrain.pretrain_worker, 2, FLAGS + ["--load", ckpt, "--override-opt_param-scheduler", "--no-load-rng"]
    )
    for before, a, b in zip(uninterrupted, first, resumed):
        got = a["losses"] + b["losses"]
        assert len(got) == 12, got
        for e, g in zip(before["losses"], got):
            assert abs(e - g) <= 2e-3 * abs(e), (before["losses"], got)


def test_muon_from_an_adam_checkpoint_needs_no_load_optim_and_says_so(tmp_path):
    """Fine-tuning across optimizers as users do it: Muon starts from an Adam torch_dist checkpoint's
    weights with --no-load-optim (and trains on); without it, the optimizer state of the other kind
    is a clear OptimizerStateMismatch naming --no-load-optim, not Megatron's missing-key error.
    (Adam loading a Muon checkpoint is not covered here: on the CPU megatron-core's Adam fails
    earlier, building its own sharded state before it reads the checkpoint.)"""
    flags = ["--use-distributed-optimizer", "--bf16", "--ckpt-format", "torch_dist", "--no-load-rng",
             "--override-opt_param-scheduler"]
    adam_ckpt = str(tmp_path / "adam")
    run_world(mcore_pretrain.pretrain_worker, 2,
              flags + ["--optimizer", "adam", "--train-iters", "3", "--save", adam_ckpt, "--save-interval", "3"])
    with pytest.raises(Exception, match="OptimizerStateMismatch.*--no-load-optim"):
        run_world(mcore_pretrain.pretrain_worker, 2, flags + ["--load", adam_ckpt, "--train-iters", "6"])
    switched = run_world(mcore_pretrain.pretrain_worker, 2,
                         flags + ["--load", adam_ckpt, "--no-load-optim", "--train-iters", "6"])
    for out in switched:
        assert out["optimizer"] == "muon" and len(out["losses"]) == 3  # resumed at iteration 3
        assert all(math.isfinite(v) for v in out["losses"])


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_pretrain_resumes_from_a_legacy_torch_format_checkpoint_like_an_uninterrupted_run(tmp_path,
                                                                                       distributed_optimizer):
    """--ckpt-format torch, Megatron's legacy per-rank files (plus distrib_optim.pt with the
    distributed optimizer): six iterations, save; a new run loads and trains six more; both halves
    follow an uninterrupted twelve-iteration run with the same flags within bf16 rounding."""
    flags = ["--bf16", "--ckpt-format", "torch"] + (["--use-distributed-optimizer"] if distributed_optimizer else [])
    ckpt = str(tmp_path / "ckpt")
    straight = run_world(mcore_pretrain.pretrain_worker, 2, flags)
    first = run_world(mcore_pretrain.pretrain_worker, 2,
                      flags + ["--train-iters", "6", "--save", ckpt, "--save-interval", "6"])
    resumed = run_world(mcore_pretrain.pretrain_worker, 2,
                        flags + ["--load", ckpt, "--override-opt_param-scheduler", "--no-load-rng"])
    for before, a, b in zip(straight, first, resumed):
        got = a["losses"] + b["losses"]
        assert len(got) == 12, got
        for e, g in zip(before["losses"], got):
            assert abs(e - g) <= 2e-3 * abs(e), (before["losses"], got)
