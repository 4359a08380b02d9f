"""QK-Clip (``optimizer.params.qk_clip_threshold``) inside real DeepSpeed engines (CPU, gloo).

Worlds of 1 and 2 ranks run the scenarios of ``_scenarios_qk_clip``: a Llama-style model with
separate q/k projections and GQA, and the project's Moonlight-mini torch model (MLA), at ZeRO-0
(one process), ZeRO-1 (DP 2; the partition boundary cuts a query weight mid-row), ZeRO-2 with
optimizer offload to the CPU and ZeRO-3 (DP 2), and bf16 with fp32 masters at ZeRO-0 and ZeRO-1
(the ZeRO optimizer and the BF16_Optimizer). Everything is checked against ``_qk_clip_model``'s
float64 references, which never call the adapter: max logits recomputed from each attention
layer's captured inputs and the weights, factors built by hand, and a single-process
:class:`muon_megatron.Muon` run that clips after each step.

Tolerances: the engines train in float32 with float32 Newton-Schulz. ``LOGIT_RTOL = 1e-5``: a max
logit recorded in float32 (or recomputed in float64 from float32 weights) against float64 (a dot
product of 6-48 float32 products: ~1e-6 relative). ``RTOL = 1e-5``: weights against the
reference after 3 steps, as in ``test_deepspeed_engine`` (other summation order of the gradients;
the factors come from float32 max logits here and float64 ones there, ~1e-7 apart). Every head's
max logit stays more than ``MARGIN`` (0.4 %) away from tau, so both sides make the same clipping
decisions.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from _harness import ok, run_world  # noqa: E402
from _qk_clip_model import (  # noqa: E402
    GROUPS, HEAD_DIM, HEADS, HIDDEN, KINDS, TAU, clip_rows64, max_logits64, mla_spec, qk_param_names, reference_run,
)
from _scenarios_qk_clip import LRS, TRAINED  # noqa: E402

LOGIT_RTOL = 1e-5
RTOL = 1e-5
MARGIN = 4e-3
OPT_KW = dict(lr=1e-2, weight_decay=0.1, ns_dtype=torch.float32)

WORLDS = {
    1: ["qk_clip_gqa_zero0", "qk_clip_mla_zero0", "qk_clip_unrecorded_layer"],
    2: ["qk_clip_gqa_zero1", "qk_clip_mla_zero1", "qk_clip_gqa_zero2_offload", "qk_clip_gqa_zero3",
        "qk_clip_off_is_unchanged", "qk_clip_resume", "qk_clip_skipped_step", "qk_clip_bf16_masters_zero0",
        "qk_clip_bf16_masters_zero1", "qk_clip_bf16_optimizer_zero1"],
}
#: trained scenarios whose data also clip heads in a step at lr > 0 (so the parity test checks the
#: order: Muon update first, then the clip); Moonlight-mini at DP 1 clips at lr 0 only.
CLIPS_AFTER_AN_UPDATE = {"qk_clip_gqa_zero0", "qk_clip_gqa_zero1", "qk_clip_mla_zero1", "qk_clip_gqa_zero2_offload",
                         "qk_clip_gqa_zero3"}


@pytest.fixture(scope="module", params=sorted(WORLDS), ids=lambda w: f"world{w}")
def world(request):
    size = request.param
    return size, run_world(size, WORLDS[size], timeout=400)


def _results(world, name):
    size, results = world
    if name not in results:
        pytest.skip(f"{name} is not run at world size {size}")
    return size, ok(results, name)


def _initial_weights(kind: str) -> dict:
    return {n: p.detach().clone() for n, p in KINDS[kind][0](0).named_parameters()}


def _all_inputs(per_rank, step: int) -> dict:
    """Every rank's captured attention inputs of ``step``, per layer."""
    out: dict[str, list] = {}
    for result in per_rank:
        for name, xs in result["steps"][step]["inputs"].items():
            out.setdefault(name, []).extend(xs)
    return out


def _weights_before(per_rank, kind: str, step: int) -> dict:
    return _initial_weights(kind) if step == 0 else per_rank[0]["steps"][step - 1]["weights"]


def _float64_maxima(per_rank, kind: str, step: int) -> dict:
    return max_logits64(kind, _weights_before(per_rank, kind, step), _all_inputs(per_rank, step))


@functools.lru_cache(maxsize=None)
def _reference(kind: str, world_size: int, gas: int):
    return reference_run(kind, world=world_size, gas=gas, lrs=LRS, tau=TAU[kind], opt_kwargs=OPT_KW)


def _max_relative_error(got: dict, want: dict) -> float:
    return max(((got[n].double() - want[n].double()).abs().max() / want[n].double().abs().max()).item() for n in want)


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_recorded_max_logits_are_the_float64_max_over_ranks_and_micro_batches(world, name):
    """The telemetry's per-layer max logit (reduced over DP ranks and micro-batches) equals the
    float64 recomputation over every rank's inputs, and the clipped-head counts follow tau."""
    _, per_rank = _results(world, name)
    kind = TRAINED[name][0]
    tau = TAU[kind]
    for step in range(len(LRS)):
        maxima = _float64_maxima(per_rank, kind, step)
        for result in per_rank:
            stats = result["steps"][step]["stats"]
            assert stats.tau == tau and set(stats.max_logit) == set(maxima)
            for layer, S in maxima.items():
                assert (S / tau - 1).abs().min() > MARGIN, f"step {step} {layer}: a head within {MARGIN} of tau"
                assert stats.max_logit[layer] == pytest.approx(float(S.max()), rel=LOGIT_RTOL), (step, layer)
                assert stats.clipped_heads[layer] == int((S > tau).sum()), (step, layer)


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_clipped_heads_land_on_tau_and_the_rest_is_untouched(world, name):
    """Step 0 runs at lr 0, so only QK-Clip changes the weights: on the same inputs each clipped
    head's float64 max logit is tau, every other head keeps its max, and every weight row outside
    the clipped heads' query/key rows is bitwise unchanged (GQA "per_head": the query rows of a
    key group none of whose heads was clipped; MLA: the unclipped heads' rows and all value rows)."""
    _, per_rank = _results(world, name)
    kind = TRAINED[name][0]
    tau = TAU[kind]
    before, after = _initial_weights(kind), per_rank[0]["steps"][0]["weights"]
    inputs = _all_inputs(per_rank, 0)
    S0, S1 = max_logits64(kind, before, inputs), max_logits64(kind, after, inputs)
    clipped = torch.cat([S > tau for S in S0.values()])
    assert clipped.any() and not clipped.all(), "the test needs clipped and unclipped heads"
    declared = set()
    for layer, S in S0.items():
        over = S > tau
        assert torch.allclose(S1[layer][over], torch.full_like(S[over], tau), rtol=LOGIT_RTOL, atol=0), layer
        assert torch.allclose(S1[layer][~over], S[~over], rtol=LOGIT_RTOL, atol=0), layer
        names = qk_param_names(kind, layer)
        declared.update(names.values())
        q_new, q_old = after[names["q"]], before[names["q"]]
        k_new, k_old = after[names["k"]], before[names["k"]]
        if kind == "gqa":
            group_clipped = over.view(GROUPS, -1).any(dim=1)
            for g in range(GROUPS):
                q_rows = slice(g * (HEADS // GROUPS) * HEAD_DIM, (g + 1) * (HEADS // GROUPS) * HEAD_DIM)
                k_rows = slice(g * HEAD_DIM, (g + 1) * HEAD_DIM)
                same = torch.equal(q_new[q_rows], q_old[q_rows]) and torch.equal(k_new[k_rows], k_old[k_rows])
                assert same != bool(group_clipped[g]), (layer, g)
        else:
            a = mla_spec().attention
            qv, qv_old = q_new.view(a.num_heads, -1, q_new.shape[1]), q_old.view(a.num_heads, -1, q_old.shape[1])
            kv, kv_old = k_new.view(a.num_heads, -1, k_new.shape[1]), k_old.view(a.num_heads, -1, k_old.shape[1])
            assert torch.equal(qv[~over], qv_old[~over]) and torch.equal(kv[~over], kv_old[~over]), layer
            assert torch.equal(kv[:, a.qk_nope_head_dim :], kv_old[:, a.qk_nope_head_dim :]), layer  # values
            assert not torch.equal(qv[over], qv_old[over]) and not torch.equal(kv[over], kv_old[over]), layer
    for n, w in before.items():
        if n not in declared:
            assert torch.equal(after[n], w), f"{n} changed in a step at lr 0"


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_weights_equal_the_single_process_muon_then_clip_reference(world, name):
    """After every step, every rank's weights equal the single-process reference: Muon on the
    full-batch gradient, then the hand-built float64 factors on the full weights."""
    size, per_rank = _results(world, name)
    kind, stage, gas, zero = TRAINED[name]
    assert per_rank[0]["wrapper"] == f"ZeRO-{stage}" + (" offload" if zero else "")
    want = _reference(kind, size, gas)
    for step in range(len(LRS)):
        for rank, result in enumerate(per_rank):
            err = _max_relative_error(result["steps"][step]["weights"], want["weights"][step])
            assert err < RTOL, f"step {step}, rank {rank}: weights differ from the reference by {err:.2e} relative"
    late = sum(per_rank[0]["steps"][step]["stats"].clipped_heads_total for step in range(1, len(LRS)))
    assert (late > 0) == (name in CLIPS_AFTER_AN_UPDATE)


def test_zero1_partition_boundary_cuts_a_declared_query_weight_mid_row(world):
    size, per_rank = _results(world, "qk_clip_gqa_zero1")
    q = "layers.1.self_attn.q_proj.weight"
    assert per_rank[0]["wrapper"] == "ZeRO-1" and per_rank[0]["holders"][q] == [0, 1]
    (start0, stop0), = per_rank[0]["pieces"][q]
    (start1, stop1), = per_rank[1]["pieces"][q]
    assert start0 == 0 and stop0 == start1 and stop1 == HEADS * HEAD_DIM * HIDDEN
    assert stop0 % HIDDEN, "the boundary should fall inside a row"


def test_telemetry_reaches_deepspeeds_monitor(world):
    """The CSV monitor (rank 0) holds the overall and per-layer max logit and clipped-head count of
    every step, equal to the optimizer's ``last_qk_clip_stats``."""
    _, per_rank = _results(world, "qk_clip_gqa_zero1")
    csv = per_rank[0]["csv"]
    steps = [s["stats"] for s in per_rank[0]["steps"]]

    def column(key):
        rows = csv[key][1:]  # a header, then (samples, value)
        assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows) and len(rows) == len(steps)
        return [float(r[1]) for r in rows]

    assert column("Train_Samples_qk_clip_max_logit") == pytest.approx([s.max_logit_overall for s in steps])
    assert column("Train_Samples_qk_clip_clipped_heads") == [s.clipped_heads_total for s in steps]
    for layer in steps[0].max_logit:
        assert column(f"Train_Samples_qk_clip_max_logit_{layer}") == pytest.approx([s.max_logit[layer] for s in steps])
        assert column(f"Train_Samples_qk_clip_clipped_heads_{layer}") == [s.clipped_heads[layer] for s in steps]


def test_qk_clip_off_or_never_reached_leaves_training_bitwise_unchanged(world):
    _, per_rank = _results(world, "qk_clip_off_is_unchanged")
    for result in per_rank:
        absent, null, unreached = result["absent"], result["null"], result["unreached"]
        assert not absent["qk_clip"] and not null["qk_clip"] and unreached["qk_clip"]
        assert absent["hooks"] == null["hooks"]  # no hook of ours when off
        assert unreached["hooks"] == (absent["hooks"][0] + 1, absent["hooks"][1] + 1)
        assert unreached["clipped"] == 0 and math.isfinite(unreached["max_logit"])
        for n, w in absent["weights"].items():
            assert torch.equal(null["weights"][n], w) and torch.equal(unreached["weights"][n], w), n


def test_resume_with_qk_clip_gives_the_same_weights_as_training_straight_through(world):
    _, per_rank = _results(world, "qk_clip_resume")
    for rank, result in enumerate(per_rank):
        assert result["clipped"][2:] == result["resumed_clipped"] and sum(result["resumed_clipped"]) > 0
        for n, w in result["straight"].items():
            assert torch.equal(w, result["resumed"][n]), f"rank {rank}: {n} differs after resume"


def test_a_step_deepspeed_skips_is_not_clipped_and_its_maxima_are_dropped(world):
    """fp16 ZeRO-1: the overflowing step leaves the fp32 masters bitwise as they were and keeps the
    previous telemetry; the next step clips from its own forward pass only: the recorder holds
    exactly what a copy of the model measures on that step's batch, although the skipped step had
    recorded larger maxima in some heads."""
    _, per_rank = _results(world, "qk_clip_skipped_step")
    larger = False
    for result in per_rank:
        assert result["skipped_steps"] == 1 and result["masters_unchanged"] and result["stats_kept"]
        for layer, own in result["own_step2"].items():
            assert torch.equal(result["recorded_step2"][layer], own), layer
            larger |= bool((result["skipped_maxima"][layer] > own * 1.01).any())
        stats = result["stats2"]
        for layer, reduced in result["own_step2_reduced"].items():
            assert stats.max_logit[layer] == float(reduced.max())
            assert stats.clipped_heads[layer] == int((reduced > result["tau"]).sum())
    assert larger, "the skipped step's maxima must exceed the next step's somewhere for this test to mean anything"


def test_a_declared_layer_that_never_records_is_an_error_naming_it(world):
    _, per_rank = _results(world, "qk_clip_unrecorded_layer")
    message = per_rank[0]
    assert message is not None and "layers.1.attention" in message and "active_recorder" in message


@pytest.mark.parametrize("name, wrapper", [("qk_clip_bf16_masters_zero0", "ZeRO-0 FP16_UnfusedOptimizer"),
                                           ("qk_clip_bf16_masters_zero1", "ZeRO-1"),
                                           ("qk_clip_bf16_optimizer_zero1", "ZeRO-1 BF16_Optimizer")])
def test_bf16_weights_are_the_clipped_fp32_masters_rounded(world, name, wrapper):
    """bf16 training (one step at lr 0): the fp32 masters of the declared weights are scaled by the
    hand-built factors of the recorded maxima (float32 rounding: 2 roundings of 2**-24 each), rows
    with factor 1 bitwise unchanged, and the model's bf16 weights are exactly the masters rounded."""
    _, per_rank = _results(world, name)
    for result in per_rank:
        assert result["wrapper"] == wrapper and result["dtype"] == "torch.bfloat16"
        clipped = 0
        for layer, S in result["maxima"].items():
            rows = clip_rows64("gqa", S.double(), TAU["gqa"], 0.5)
            for part, pname in qk_param_names("gqa", layer).items():
                before, after = result["before"][pname], result["after"][pname]
                want = before.double() * rows[part].unsqueeze(1)
                assert torch.allclose(after.double(), want, rtol=2.5e-7, atol=0), pname
                ones = rows[part] == 1
                assert torch.equal(after[ones], before[ones]), pname
                clipped += int((~ones).sum())
                assert torch.equal(result["model"][pname], after.to(torch.bfloat16)), pname
        assert clipped > 0
