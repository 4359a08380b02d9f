"""muon_megatron's Muon inside real DeepSpeed engines (CPU accelerator, gloo), world sizes 1, 2, 4.

Each world size is spawned once per module and runs the scenarios of ``_scenarios`` listed in
``WORLDS``; the tests below check their results against the single-process
:class:`muon_megatron.Muon` on the full-batch gradient (``_model.reference_weights``).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from _harness import ok, run_world  # noqa: E402
from _model import reference_weights  # noqa: E402

# float32 Newton-Schulz, float32 weights; the engine reduces gradients in another summation order
# than the reference's single backward, which after 4 steps moves weights by ~2e-7 relative.
RTOL = 1e-5
# bf16 forward/backward (8-bit mantissa), bf16 weights and bf16 Newton-Schulz against the float32
# reference after 4 steps at lr 1e-2: observed 3.8e-2; a sanity bound, not a parity claim.
BF16_RTOL = 1e-1
OPT_KW = dict(lr=1e-2, weight_decay=0.1, ns_dtype=torch.float32)
STEPS = 4
MUON_MATRICES = ("fc1.weight", "fc2.weight", "proj.weight")

PARITY = {
    # scenario: (ZeRO stage, gradient accumulation, clipping)
    "parity_zero0": (0, 1, 1.0),
    "parity_zero1": (1, 1, 1.0),
    "parity_zero2": (2, 1, 1.0),
    "parity_zero1_accumulation": (1, 3, 1.0),
    "parity_zero1_strong_clipping": (1, 1, 0.05),
    "parity_zero1_no_clipping": (1, 1, 0.0),
    "parity_zero0_accumulation": (0, 2, 0.05),
}

WORLDS = {
    1: ["parity_zero0", "parity_zero1", "resume_zero0", "builtin_switch_keeps_deepspeed_muon",
        "install_routes_plain_initialize", "lr_scheduler_reaches_muon"],
    2: ["parity_zero0", "parity_zero1", "parity_zero2", "parity_zero1_accumulation", "parity_zero1_strong_clipping",
        "parity_zero1_no_clipping", "parity_zero0_accumulation", "resume_zero1", "adamw_checkpoint_into_muon",
        "fp16_overflow_skips_step", "bf16_zero1", "half_precision_zero0", "tensor_parallel_zero0", "tensor_parallel_zero1",
        "moe_experts_orthogonalised_each_on_its_own"],
    4: ["parity_zero0", "parity_zero1", "parity_zero1_accumulation", "resume_zero1", "tensor_parallel_zero0",
        "tensor_parallel_zero1"],
}


@pytest.fixture(scope="module", params=sorted(WORLDS), ids=lambda w: f"world{w}")
def world(request):
    size = request.param
    return size, run_world(size, WORLDS[size], timeout=400)


def _results(world, name):
    size, results = world
    if name not in results:
        pytest.skip(f"{name} is not run at world size {size}")
    return size, ok(results, name)


@functools.lru_cache(maxsize=None)
def _reference(world_size: int, gas: int, clip: float, steps: int = STEPS):
    return reference_weights(steps, world_size, gas, clip=clip, opt_kwargs=OPT_KW)


def _max_relative_error(got: dict, want: dict) -> float:
    return max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)


@pytest.mark.parametrize("name", sorted(PARITY))
def test_weights_equal_single_process_reference(world, name):
    size, per_rank = _results(world, name)
    stage, gas, clip = PARITY[name]
    want = _reference(size, gas, clip)
    for rank, result in enumerate(per_rank):
        err = _max_relative_error(result["weights"], want)
        assert err < RTOL, f"rank {rank}: weights differ from the reference by {err:.2e} relative"


@pytest.mark.parametrize("name", sorted(PARITY))
def test_each_matrix_orthogonalised_once_per_optimizer_step(world, name):
    _, per_rank = _results(world, name)
    assert per_rank[0]["ns_matrices"] == STEPS * len(MUON_MATRICES)
    assert per_rank[0]["ns_backends"] == ["AutoOrthogonalizer"]


def test_zero1_matrices_straddle_partitions_at_dp4(world):
    """The parity tests above are only meaningful if matrices really are cut between ranks."""
    size, per_rank = _results(world, "parity_zero1")
    holders = per_rank[0]["holders"]
    assert set(holders) == set(MUON_MATRICES)
    if size == 4:
        assert all(len(holders[m]) > 1 for m in MUON_MATRICES), holders
    if size == 2:
        assert holders["fc2.weight"] == [0, 1], holders


def test_zero0_replicas_are_orthogonalised_on_one_rank(world):
    size, per_rank = _results(world, "parity_zero0")
    assert per_rank[0]["wrapper"] == "ZeRO-0"
    assert all(r == list(range(size)) for r in per_rank[0]["holders"].values())


def test_resume_gives_the_same_weights_as_training_straight_through(world):
    size, results = world
    name = next((n for n in ("resume_zero1", "resume_zero0") if n in results), None)
    if name is None:
        pytest.skip("no resume scenario at this world size")
    for rank, result in enumerate(ok(results, name)):
        for n, w in result["straight"].items():
            assert torch.equal(w, result["resumed"][n]), f"rank {rank}: {n} differs after resume"


def test_adamw_checkpoint_state_is_refused_with_a_message_and_weights_load_alone(world):
    _, per_rank = _results(world, "adamw_checkpoint_into_muon")
    for result in per_rank:
        assert "Adam/AdamW" in result["message"] and "load_optimizer_states=False" in result["message"]
        for n, w in result["saved"].items():
            assert torch.equal(w, result["loaded"][n])
        assert all(torch.isfinite(torch.tensor(result["losses"])))


def test_fp16_overflow_skips_step_and_leaves_momentum_untouched(world):
    _, per_rank = _results(world, "fp16_overflow_skips_step")
    for result in per_rank:
        assert result["master_unchanged"] and result["state_unchanged"]
        assert result["scale_after"] == result["scale_before"] / 2
        assert result["skipped_steps"] == 1 and result["inner_skipped"] == 0
        assert result["moved_after"] and result["weights_finite"]


def test_bf16_zero1_tracks_the_reference_within_bf16_rounding(world):
    size, per_rank = _results(world, "bf16_zero1")
    assert per_rank[0]["wrapper"] == "ZeRO-1"
    err = _max_relative_error(per_rank[0]["weights"], _reference(size, 1, 1.0))
    assert err < BF16_RTOL


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_zero0_tracks_the_reference(world, precision):
    """ZeRO-0 fp16/bf16: DeepSpeed's FP16_UnfusedOptimizer keeps fp32 masters around our optimizer
    (and calls its step once with zero gradients while constructing, which must change nothing)."""
    size, per_rank = _results(world, "half_precision_zero0")
    result = per_rank[0][precision]
    assert result["wrapper"] == "ZeRO-0 FP16_UnfusedOptimizer" and result["skipped"] == 0
    assert _max_relative_error(result["weights"], _reference(size, 1, 1.0)) < BF16_RTOL


def test_implementation_deepspeed_keeps_the_builtin_muon(world):
    _, per_rank = _results(world, "builtin_switch_keeps_deepspeed_muon")
    assert per_rank[0] == "MuonWithAuxAdam"


def test_install_makes_plain_deepspeed_initialize_select_our_muon(world):
    _, per_rank = _results(world, "install_routes_plain_initialize")
    assert per_rank[0] == {"optimizer": "DeepSpeedMuon", "bound": "ZeRO-1", "restored": True}


def test_lr_scheduler_changes_reach_the_muon_step(world):
    _, per_rank = _results(world, "lr_scheduler_reaches_muon")
    result = per_rank[0]
    assert result["used"] == result["public_before_step"]
    assert result["used"][-1][0] > 0


@pytest.mark.parametrize("name", ["tensor_parallel_zero0", "tensor_parallel_zero1"])
def test_tensor_parallel_slices_are_orthogonalised_as_full_matrices(world, name):
    """TP 2 (x DP 1 or 2) through an mpu: the gathered weights equal the single-process reference on
    the full matrices, each matrix orthogonalised once per step across TP x DP."""
    size, per_rank = _results(world, name)
    dp = per_rank[0]["dp"]
    want = _reference(dp, 1, 0.0)
    for rank, result in enumerate(per_rank):
        err = _max_relative_error(result["weights"], want)
        assert err < RTOL, f"rank {rank}: weights differ from the reference by {err:.2e} relative"
    assert per_rank[0]["ns_matrices"] == STEPS * len(MUON_MATRICES)
    assert per_rank[0]["holders"]["fc1.weight"] == list(range(size))


def test_moe_experts_are_orthogonalised_each_on_its_own_within_expert_groups(world):
    size, per_rank = _results(world, "moe_experts_orthogonalised_each_on_its_own")
    for result in per_rank:
        assert result["moe_groups"] == [f"ep_size_{size}"] and result["moe_group_sizes"] == [1]
        experts = [m for m in result["holders"] if "deepspeed_experts" in m]
        assert len(experts) == 4  # 2 local experts x (up, down), each a matrix of its own
        lo, hi = result["band"]
        for name, singular_values in result["bands"].items():
            in_band = [s for s in singular_values if s > 1e-3]
            assert len(in_band) >= 4 and all(lo <= s <= hi for s in in_band), (name, singular_values)
        assert all(torch.isfinite(torch.tensor(result["losses"])))


def test_universal_checkpoint_resumes_at_another_data_parallel_size(tmp_path, monkeypatch):
    """ZeRO-1 at DP 2 -> muon_megatron's universal converter -> DeepSpeed's universal loader at DP 1
    (gradient accumulation 2, same global batch): the weights after two more steps equal those of
    training straight through at DP 2 (momentum included, since training continues from it)."""
    monkeypatch.setenv("MUON_DS_SHARED_DIR", str(tmp_path))
    saved = ok(run_world(2, ["universal_checkpoint_dp2_to_dp1"], timeout=400), "universal_checkpoint_dp2_to_dp1")
    resumed = ok(run_world(1, ["universal_checkpoint_load_at_dp1"], timeout=400), "universal_checkpoint_load_at_dp1")
    err = _max_relative_error(resumed[0]["resumed"], saved[0]["straight"])
    assert err < RTOL
    assert (tmp_path / "mid_universal" / "zero" / "fc2.weight" / "momentum_buffer.pt").exists()
    assert (tmp_path / "mid_universal" / "zero" / "norm.weight" / "exp_avg_sq.pt").exists()
