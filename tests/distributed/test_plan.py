"""The planner on its own: pure functions, no process groups."""

from __future__ import annotations

import random

import pytest
import torch

import muon_megatron as mm
from muon_megatron.distributed import (
    AlignItem,
    ParamLayout,
    ParamSpec,
    PlanError,
    aligned_layout,
    bucketed_layouts,
    flat_layouts,
    holdings,
    make_plan,
    ns_flops,
    tensor_parallel_full_shape,
    tensor_parallel_shard,
)


def _plan_of(per_rank):
    hs = [h for r, layouts in enumerate(per_rank) for s, lay in enumerate(layouts) for h in holdings(lay, r, s)]
    return make_plan(hs, len(per_rank))


def test_ns_flops_matches_the_dense_formula_for_wide_and_tall():
    m, n = 1408, 2048
    assert ns_flops(m, n) == 20 * m * m * n + 10 * m**3
    assert ns_flops(n, m) == ns_flops(m, n)


def test_holdings_of_a_flat_range_tile_exactly_that_range():
    rng = random.Random(0)
    for _ in range(50):
        R, C = rng.randint(1, 9), rng.randint(1, 9)
        a = rng.randint(0, R * C - 1)
        b = rng.randint(a + 1, R * C)
        (h,) = holdings(ParamLayout("w", (R, C), flat_range=(a, b)), 0, 0)
        cells = {(r.row + i, r.col + j) for r in h.rects for i in range(r.rows) for j in range(r.cols)}
        assert cells == {divmod(k, C) for k in range(a, b)}
        # buffer offsets address exactly the range, relative to its start
        offsets = {r.offset + i * r.stride + j for r in h.rects for i in range(r.rows) for j in range(r.cols)}
        assert offsets == set(range(b - a))


def test_plan_owner_holds_a_piece_and_every_matrix_has_one_owner():
    specs = [ParamSpec(f"w{i}", (32, 48 + i)) for i in range(12)]
    plan = _plan_of(flat_layouts(specs, 4))
    assert len(plan.matrices) == 12
    for mp in plan.matrices:
        assert mp.owner in {h.rank for h in mp.sources}


def test_plan_is_independent_of_holding_order():
    specs = [ParamSpec(f"w{i}", (16, 24)) for i in range(9)] + [ParamSpec("e", (4, 8, 8), mm.ExpertStack(4))]
    per_rank = flat_layouts(specs, 3)
    hs = [h for r, ls in enumerate(per_rank) for s, lay in enumerate(ls) for h in holdings(lay, r, s)]
    shuffled = hs[:]
    random.Random(1).shuffle(shuffled)
    assert make_plan(hs, 3) == make_plan(shuffled, 3)


def test_lpt_balances_many_equal_matrices_within_5_percent():
    specs = [ParamSpec(f"expert{i}", (1408, 2048)) for i in range(256)]
    plan = _plan_of(flat_layouts(specs, 8))
    assert plan.imbalance <= 1.05


def test_same_shape_matrices_of_one_owner_share_one_bucket():
    specs = [ParamSpec(f"w{i}", (8, 8)) for i in range(6)] + [ParamSpec(f"v{i}", (4, 8)) for i in range(6)]
    plan = _plan_of([[ParamLayout(s.key, s.shape) for s in specs]])  # one rank holds everything
    assert sorted(shape for shape, _ in plan.buckets[0]) == [(4, 8), (8, 8)]
    assert all(len(ix) == 6 for _, ix in plan.buckets[0])


def test_inconsistent_shapes_between_ranks_name_the_matrix():
    with pytest.raises(PlanError, match="'w'"):
        _plan_of([[ParamLayout("w", (4, 6), flat_range=(0, 12))], [ParamLayout("w", (6, 4), flat_range=(12, 24))]])


def test_a_piece_that_no_rank_holds_is_an_error_naming_the_matrix():
    with pytest.raises(PlanError, match=r"'w'.*cover 20 of 24"):
        _plan_of([[ParamLayout("w", (4, 6), flat_range=(0, 12))], [ParamLayout("w", (4, 6), flat_range=(16, 24))]])


def test_overlapping_pieces_that_are_not_replicas_are_an_error():
    with pytest.raises(PlanError, match="'w'"):
        _plan_of([[ParamLayout("w", (4, 6), flat_range=(0, 14))], [ParamLayout("w", (4, 6), flat_range=(10, 24))],
                  [ParamLayout("w", (4, 6), flat_range=(0, 4))]])


def test_replicas_are_sent_once_and_all_get_results():
    per_rank = [[ParamLayout("w", (8, 8))] for _ in range(4)]
    plan = _plan_of(per_rank)
    (mp,) = plan.matrices
    assert len(mp.sources) == 1 and mp.sources[0].rank == mp.owner
    assert sorted(h.rank for h in mp.returns) == [0, 1, 2, 3]
    assert sum(plan.gather_elems) == 0 and sum(plan.return_elems) == 3 * 64


def test_aligned_layout_puts_each_matrix_whole_in_one_partition_and_needs_no_gather():
    rng = random.Random(3)
    specs = [ParamSpec(f"w{i}", (rng.randint(4, 40), rng.randint(4, 40))) for i in range(30)]
    dp = 4
    items = [AlignItem(s.key, s.numel, ns_flops(*s.shape)) for s in specs]
    layout = aligned_layout(items, dp)
    size = layout.partition_size
    for s in specs:
        start = layout.offsets[s.key]
        assert start // size == (start + s.numel - 1) // size == layout.rank_of[s.key]
    plan = _plan_of(layout.layouts(specs))
    assert sum(plan.gather_elems) == 0 and sum(plan.return_elems) == 0
    assert plan.imbalance == pytest.approx(max(layout.flops) / (sum(layout.flops) / dp))
    assert plan.imbalance <= 1.05


def test_aligned_layout_cuts_an_oversized_item_and_still_balances():
    # one fused gate|up heavier than a rank's fair share, among many small matrices
    specs = [ParamSpec("fc1", (64, 32), mm.GateUp())] + [ParamSpec(f"w{i}", (8, 16)) for i in range(200)]
    items = [AlignItem.of(s.key, s.shape, s.split) for s in specs]
    assert len(items[0].parts) == 2  # gate and up are contiguous halves
    layout = aligned_layout(items, 4)
    assert layout.rank_of["fc1"] is None and all(layout.rank_of[s.key] is not None for s in specs[1:])
    plan = _plan_of(layout.layouts(specs))
    assert plan.imbalance <= 1.05
    # only the oversized item's pieces travel
    assert sum(plan.gather_elems) + sum(plan.return_elems) <= 2 * 64 * 32


def test_owner_policy_any_moves_work_off_an_overloaded_holder():
    # rank 0 holds every matrix whole; ranks 1-3 hold nothing of them (only a tiny one each)
    per_rank = [[ParamLayout(f"w{i}", (16, 16)) for i in range(8)]] + [[ParamLayout(f"t{r}", (2, 2))] for r in (1, 2, 3)]
    hs = [h for r, ls in enumerate(per_rank) for s, lay in enumerate(ls) for h in holdings(lay, r, s)]
    assert make_plan(hs, 4).flops[0] == pytest.approx(8 * ns_flops(16, 16))
    spread = make_plan(hs, 4, owners="any")
    assert spread.imbalance < 1.2
    assert sum(spread.gather_elems) > 0  # the moved matrices travel whole


def test_unknown_owner_policy_is_rejected():
    with pytest.raises(ValueError, match="owners"):
        make_plan([], 1, owners="nearest")


def test_bucketed_layouts_cover_every_muon_element_once():
    specs = [ParamSpec(f"w{i}", (30, 50)) for i in range(10)] + [ParamSpec("b", (50,), use_muon=False)]
    per_rank = bucketed_layouts(specs, 4, bucket_numel=3000)
    plan = _plan_of(per_rank)  # make_plan validates the tiling
    assert len(plan.matrices) == 10
    assert sum(lay.numel for ls in per_rank for lay in ls) == 10 * 1500


@pytest.mark.parametrize("dim", [0, 1])
def test_tensor_parallel_shard_is_the_chunk_torch_cuts(dim):
    full = torch.arange(12 * 20).reshape(12, 20)
    for rank, chunk in enumerate(full.chunk(4, dim=dim)):
        assert tensor_parallel_full_shape(chunk.shape, dim, 4) == (12, 20)
        r, c, h, w = tensor_parallel_shard((12, 20), dim, 4, rank)
        assert torch.equal(full[r : r + h, c : c + w], chunk)
    assert tensor_parallel_shard((12, 20), None, 4, 1) is None and tensor_parallel_shard((12, 20), 0, 1, 0) is None


@pytest.mark.parametrize("args", [((12, 20), 2, 2, 0), ((12, 20), 0, 5, 0), ((12, 20), 1, 2, 2)])
def test_tensor_parallel_shard_refuses_uneven_or_unknown_cuts(args):
    with pytest.raises(ValueError, match="tensor-parallel shards"):
        tensor_parallel_shard(*args)
