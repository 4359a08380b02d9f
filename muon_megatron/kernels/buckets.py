"""Newton-Schulz buckets: which matrices go through one batched call together (pure, no tensors).

Matrices of one shape form a group and are stacked into one batched call (paper Algorithm 1
notes the NS work dominates; batching is what brings it near the matmul rate, MOONLIGHT.md:
474 vs 128 TFLOP/s). Groups too small to fill the GPU are merged by zero padding when the cost
model says one padded launch chain is cheaper than two: padding a matrix with zero rows or
columns leaves its Newton-Schulz result exactly unchanged (``X X^T`` only gains zero rows and
columns, ``B X`` only zero entries, the Frobenius norm is the same), so merging is free in
accuracy. Large groups are cut into chunks of at most ``max_batch`` matrices so the transient
memory of one call stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..core.newton_schulz import ns_flops
from ..core.update import group_by_shape

# One batched NS call issues about 3 launches per iteration plus a few more; at 5 us each and
# ~500 TFLOP/s that is worth ~4e10 FLOPs of work (a 576 x 2048 NS5 costs 1.6e10).
DEFAULT_LAUNCH_COST_FLOPS = 4e10


@dataclass(frozen=True)
class NSBucket:
    """One batched Newton-Schulz call: ``indices`` (positions in the planned shape list, in
    stacking order) and the common ``shape`` they are zero-padded to (equal to each matrix's
    own shape unless the bucket merged groups)."""

    shape: tuple[int, int]
    indices: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]

    @property
    def batch(self) -> int:
        return len(self.indices)

    @property
    def padded(self) -> bool:
        return any(s != self.shape for s in self.shapes)

    def flops(self, steps: int = 5) -> float:
        """Dense FLOPs actually executed (padded shape)."""
        return self.batch * ns_flops(*self.shape, steps)

    def useful_flops(self, steps: int = 5) -> float:
        """Dense FLOPs of the matrices themselves (what a TFLOP/s figure should count)."""
        return sum(ns_flops(*s, steps) for s in self.shapes)


@dataclass(frozen=True)
class NSBuckets:
    """The buckets covering every planned matrix exactly once."""

    buckets: tuple[NSBucket, ...]
    num_matrices: int


def _orientation(shape: tuple[int, int]) -> bool:
    return shape[0] > shape[1]


def _cost(shape: tuple[int, int], batch: int, steps: int, launch_cost: float) -> float:
    return launch_cost + batch * ns_flops(*shape, steps)


def ns_buckets(
    shapes: Sequence[tuple[int, int]],
    *,
    steps: int = 5,
    launch_cost_flops: float = DEFAULT_LAUNCH_COST_FLOPS,
    max_batch: int = 128,
    merge: bool = True,
) -> NSBuckets:
    """Group ``shapes`` (one ``(rows, cols)`` per matrix) into Newton-Schulz buckets.

    Exact-shape groups keep first-appearance order and, inside a group, input order (so the
    matrices of one 3-D expert stack stay consecutive). With ``merge``, groups of the same
    orientation are merged greedily, best saving first, while
    ``cost = launch_cost_flops + batch * ns_flops(padded shape)`` decreases. Then buckets larger
    than ``max_batch`` are cut into near-equal chunks.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    for i, s in enumerate(shapes):
        if min(int(v) for v in s) < 1:
            raise ValueError(f"matrix {i} has an empty shape {tuple(s)}")
    groups = group_by_shape(shapes)
    # Each working bucket: (padded shape, [exact shapes in order])
    work: list[tuple[tuple[int, int], list[tuple[int, int]]]] = [(s, [s]) for s in groups]
    while merge:
        best = None
        for x in range(len(work)):
            for y in range(x + 1, len(work)):
                (sx, mx), (sy, my) = work[x], work[y]
                if _orientation(sx) != _orientation(sy):
                    continue
                bx = sum(len(groups[s]) for s in mx)
                by = sum(len(groups[s]) for s in my)
                shape = (max(sx[0], sy[0]), max(sx[1], sy[1]))
                if _orientation(shape) != _orientation(sx):
                    continue
                saving = (_cost(sx, bx, steps, launch_cost_flops) + _cost(sy, by, steps, launch_cost_flops)
                          - _cost(shape, bx + by, steps, launch_cost_flops))
                if saving > 0 and (best is None or saving > best[0]):
                    best = (saving, x, y, shape)
        if best is None:
            break
        _, x, y, shape = best
        merged = (shape, work[x][1] + work[y][1])
        work = [w for k, w in enumerate(work) if k not in (x, y)] + [merged]
    buckets = []
    for shape, members in work:
        indices = [i for s in members for i in groups[s]]
        pieces = -(-len(indices) // max_batch)
        size = -(-len(indices) // pieces)
        for start in range(0, len(indices), size):
            chunk = tuple(indices[start:start + size])
            buckets.append(NSBucket(shape, chunk, tuple((int(shapes[i][0]), int(shapes[i][1])) for i in chunk)))
    return NSBuckets(tuple(buckets), len(shapes))
