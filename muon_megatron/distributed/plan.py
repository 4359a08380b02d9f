"""The planner: holdings of every rank in, a frozen plan out. Pure: no process groups.

For every logical matrix the plan names one *owner* among the ranks that hold a piece of it
(longest-processing-time greedy on Newton-Schulz FLOPs, so the work is balanced), the *sources*
that send the owner each region (one replica per region, the owner itself where it holds it), and
the *returns*: every holding receives its region of the result. Owned matrices are bucketed by
shape for batched Newton-Schulz. Every rank computes the same plan from the same all-gathered
holdings, so a bad layout fails on every rank with the same message, before any collective.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from ..core.newton_schulz import ns_flops
from ..core.update import group_by_shape
from .layout import MatrixHolding


class PlanError(ValueError):
    """The holdings do not describe a consistent layout; the message names the matrix."""


@dataclass(frozen=True)
class MatrixPlan:
    """One logical matrix: ``owner`` orthogonalises it; ``sources`` (holdings) send it their
    regions; ``returns`` (holdings, replicas included) receive their regions of the result."""

    name: str
    shape: tuple[int, int]
    owner: int
    flops: float
    sources: tuple[MatrixHolding, ...]
    returns: tuple[MatrixHolding, ...]


@dataclass(frozen=True)
class Plan:
    """The frozen plan. ``matrices`` in a canonical order (every rank iterates it the same way);
    ``buckets[rank]``: ``(shape, matrix indices)`` batches that rank orthogonalises;
    ``flops[rank]``; ``gather_elems[rank]`` / ``return_elems[rank]``: elements the rank sends
    in the gather and in the return exchange."""

    world_size: int
    matrices: tuple[MatrixPlan, ...]
    buckets: tuple[tuple[tuple[tuple[int, int], tuple[int, ...]], ...], ...]
    flops: tuple[float, ...]
    gather_elems: tuple[int, ...]
    return_elems: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """max-rank / mean-rank NS FLOPs (1.0 is perfect balance)."""
        mean = sum(self.flops) / max(1, len(self.flops))
        return max(self.flops) / mean if mean else 1.0

    def send_bytes(self, element_size: int = 2) -> list[int]:
        """Bytes each rank sends per step (gather + return), at ``element_size`` bytes/element."""
        return [(g + r) * element_size for g, r in zip(self.gather_elems, self.return_elems)]

    def owned(self, rank: int) -> list[int]:
        return [i for i, m in enumerate(self.matrices) if m.owner == rank]

    def summary(self) -> str:
        lines = [f"plan: {len(self.matrices)} matrices on {self.world_size} ranks, "
                 f"NS imbalance {self.imbalance:.3f}"]
        for r in range(self.world_size):
            lines.append(
                f"  rank {r}: {len(self.owned(r))} owned, {self.flops[r] / 1e9:.2f} GFLOP, "
                f"sends {self.gather_elems[r]} + {self.return_elems[r]} elements"
            )
        return "\n".join(lines)


def _replica_classes(name: str, shape, holdings: Sequence[MatrixHolding]) -> list[list[MatrixHolding]]:
    """Group holdings of one matrix into replica classes (identical regions) and check that the
    classes tile the matrix: disjoint, inside it, covering every element exactly once."""
    m, n = shape
    classes: dict[tuple, list[MatrixHolding]] = {}
    for h in holdings:
        if tuple(h.shape) != tuple(shape):
            raise PlanError(f"matrix {name!r}: rank {h.rank} says shape {h.shape}, rank {holdings[0].rank} says {shape}")
        classes.setdefault(h.geometry, []).append(h)
    cells = []
    for geometry in classes:
        for row, col, rows, cols in geometry:
            if row < 0 or col < 0 or row + rows > m or col + cols > n:
                raise PlanError(f"matrix {name!r}: region {(row, col, rows, cols)} lies outside {shape}")
            cells.append((row, col, rows, cols))
    if sum(r * c for _, _, r, c in cells) != m * n:
        covered = sum(r * c for _, _, r, c in cells)
        raise PlanError(
            f"matrix {name!r}: the ranks' pieces cover {covered} of {m * n} elements "
            f"(holders {sorted({h.rank for h in holdings})}); a piece is missing or overlaps another"
        )
    cells.sort()
    # Equal total area plus pairwise disjointness means an exact tiling.
    by_row = sorted(cells)
    for i, a in enumerate(by_row):
        for b in by_row[i + 1 :]:
            if b[0] >= a[0] + a[2]:
                break
            if b[1] < a[1] + a[3] and a[1] < b[1] + b[3]:
                raise PlanError(f"matrix {name!r}: pieces {a} and {b} overlap without being replicas")
    return [classes[g] for g in sorted(classes)]


OWNER_POLICIES = ("holders", "any")


def make_plan(
    holdings: Sequence[MatrixHolding], world_size: int, *, ns_steps: int = 5, owners: str = "holders"
) -> Plan:
    """Build the plan from the holdings of all ranks (ranks in ``range(world_size)``).

    ``owners="holders"`` (default): each owner is one of the ranks holding a piece of the
    matrix, so only pieces travel; balance is then bounded by the layout (a rank whose partition
    holds only AdamW parameters can own nothing). ``owners="any"``: a matrix may go to a rank
    that holds none of it when that rank's load is lower by at least the matrix's own FLOPs
    (the move never raises the larger of the two loads); the whole matrix then travels there
    and back. Use :func:`muon_megatron.distributed.aligned_layout` to get balance with no
    traffic at all.

    Raises :class:`PlanError` naming the matrix for inconsistent shapes, gaps or overlaps.
    Deterministic: the same holdings in any order give the same plan.
    """
    if owners not in OWNER_POLICIES:
        raise ValueError(f"owners must be one of {OWNER_POLICIES}, got {owners!r}")
    by_matrix: dict[str, list[MatrixHolding]] = defaultdict(list)
    for h in holdings:
        if not 0 <= h.rank < world_size:
            raise PlanError(f"matrix {h.matrix!r}: holder rank {h.rank} outside world of {world_size}")
        by_matrix[h.matrix].append(h)
    names = sorted(by_matrix)
    classes = {}
    for name in names:
        hs = sorted(by_matrix[name], key=lambda h: (h.rank, h.slot, h.geometry))
        classes[name] = _replica_classes(name, hs[0].shape, hs)
    flops = {name: ns_flops(*by_matrix[name][0].shape, steps=ns_steps) for name in names}

    # Longest-processing-time greedy: heaviest first onto the least-loaded holder; ties go to
    # the holder with more of the matrix (less traffic), then the lower rank.
    load = [0.0] * world_size
    owner = {}
    for name in sorted(names, key=lambda x: (-flops[x], x)):
        held = defaultdict(int)
        for h in by_matrix[name]:
            held[h.rank] += h.numel
        best = min(held, key=lambda r: (load[r], -held[r], r))
        if owners == "any":
            idle = min(range(world_size), key=lambda r: (load[r], r))
            if idle != best and load[best] - load[idle] >= flops[name]:
                best = idle
        owner[name] = best
        load[best] += flops[name]

    gather = [0] * world_size
    back = [0] * world_size
    plans = []
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for index, name in enumerate(names):
        o = owner[name]
        sources = []
        for cls in classes[name]:
            mine = [h for h in cls if h.rank == o]
            src = mine[0] if mine else min(cls, key=lambda h: (gather[h.rank], h.rank, h.slot))
            if src.rank != o:
                gather[src.rank] += src.numel
            sources.append(src)
        returns = [h for cls in classes[name] for h in cls]
        back[o] += sum(h.numel for h in returns if h.rank != o)
        shape = tuple(by_matrix[name][0].shape)
        plans.append(MatrixPlan(name, shape, o, flops[name], tuple(sources), tuple(returns)))
        owned[o].append(index)
    buckets = tuple(
        tuple(sorted((shape, tuple(mine[k] for k in ks))
                     for shape, ks in group_by_shape(plans[i].shape for i in mine).items()))
        for mine in owned
    )
    return Plan(
        world_size,
        tuple(plans),
        buckets,
        tuple(load),
        tuple(gather),
        tuple(back),
    )
