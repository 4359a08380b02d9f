"""Where each logical matrix lives: frozen descriptions, no process groups.

A rank holds, for a parameter, one *local tensor*: a tensor-parallel shard of the parameter's
full 2-D view (``ParamLayout.shard``, a rectangle of that view, stored row-major), of which it may
keep only a flat element range (``ParamLayout.flat_range``, ZeRO-1). :func:`holdings` intersects
that with the parameter's split spec and yields, per logical matrix, the rectangles this rank holds
and where they sit in its piece buffer. Every copy the runtime makes is a strided slice of those.

Also here: :func:`aligned_layout`, the ordering of a flat buffer that puts each Muon matrix whole
inside one data-parallel partition (balanced by Newton-Schulz FLOPs) so the engine's own
reduce-scatter delivers whole matrices to their owners, and :func:`bucketed_layouts` /
:func:`flat_layouts`, simulations of Megatron's bucketed and DeepSpeed's flat ZeRO-1 sharding for
planning without processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..core.splits import LogicalMatrix, SplitSpec, check_tiling, default_split

Rect = tuple[int, int, int, int]  # (row, col, rows, cols)


@dataclass(frozen=True)
class ParamLayout:
    """One rank's holding of one parameter.

    key: the parameter's name, identical on every rank that holds part of it.
    full_shape: shape of the full (unsharded) parameter, as its ``split`` reads it.
    split: the :class:`SplitSpec` (default: ``default_split(full_shape)``).
    shard: ``(row, col, rows, cols)`` of the full 2-D view held as this rank's local tensor
        (row-major), e.g. a tensor-parallel shard; None means the whole view.
    flat_range: ``(start, stop)`` of the local tensor's row-major elements kept on this rank (a
        ZeRO-1 partition); None means all of them.
    """

    key: str
    full_shape: tuple[int, ...]
    split: Optional[SplitSpec] = None
    shard: Optional[Rect] = None
    flat_range: Optional[tuple[int, int]] = None

    def __post_init__(self):
        object.__setattr__(self, "full_shape", tuple(int(s) for s in self.full_shape))
        if self.split is None:
            object.__setattr__(self, "split", default_split(self.full_shape))

    @property
    def view_shape(self) -> tuple[int, int]:
        return self.split.view_shape(self.full_shape)

    @property
    def shard_rect(self) -> Rect:
        R, C = self.view_shape
        return self.shard if self.shard is not None else (0, 0, R, C)

    @property
    def range(self) -> tuple[int, int]:
        _, _, h, w = self.shard_rect
        return self.flat_range if self.flat_range is not None else (0, h * w)

    @property
    def numel(self) -> int:
        start, stop = self.range
        return stop - start

    def matrices(self) -> tuple[LogicalMatrix, ...]:
        return _matrices(self.split, self.full_shape, self.key)

    def validate(self) -> None:
        """ValueError naming the parameter if the shard or range do not fit its view."""
        R, C = self.view_shape
        r, c, h, w = self.shard_rect
        if h < 1 or w < 1 or r < 0 or c < 0 or r + h > R or c + w > C:
            raise ValueError(f"parameter {self.key!r}: shard {self.shard} lies outside its view {(R, C)}")
        start, stop = self.range
        if not 0 <= start <= stop <= h * w:
            raise ValueError(
                f"parameter {self.key!r}: flat_range {self.flat_range} outside its local tensor of {h * w} elements"
            )
        self.matrices()


_MATRIX_CACHE: dict = {}


def _matrices(split: SplitSpec, shape: tuple[int, ...], key: str) -> tuple[LogicalMatrix, ...]:
    cache_key = (split, shape)
    if cache_key not in _MATRIX_CACHE:
        mats = split.matrices(shape)
        check_tiling(mats, split.view_shape(shape), f"parameter {key!r}")
        _MATRIX_CACHE[cache_key] = mats
    return _MATRIX_CACHE[cache_key]


def matrix_name(key: str, mat: LogicalMatrix) -> str:
    """Global name of a logical matrix: the parameter key, then the split's suffix."""
    return f"{key}.{mat.name}" if mat.name else key


@dataclass(frozen=True)
class PieceRect:
    """``rows x cols`` elements at ``(row, col)`` of a logical matrix, stored in the piece buffer
    at ``offset + i * stride + j`` (the piece buffer is the rank's flat range of its local tensor)."""

    row: int
    col: int
    rows: int
    cols: int
    offset: int
    stride: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class MatrixHolding:
    """What one rank holds of one logical matrix: its rectangles, and ``slot``, the index of the
    holding piece in that rank's list of layouts (so the rank finds its tensor)."""

    matrix: str
    shape: tuple[int, int]
    rank: int
    slot: int
    rects: tuple[PieceRect, ...]

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rects)

    @property
    def geometry(self) -> tuple[tuple[int, int, int, int], ...]:
        return tuple(sorted((r.row, r.col, r.rows, r.cols) for r in self.rects))


def _range_rects(start: int, stop: int, width: int) -> list[Rect]:
    """Row-major elements ``[start, stop)`` of a ``? x width`` array as at most three rectangles."""
    if stop <= start:
        return []
    first_row, first_col = divmod(start, width)
    last_row, last_col = divmod(stop, width)  # exclusive
    if first_row == last_row:
        return [(first_row, first_col, 1, stop - start)]
    rects = []
    row = first_row
    if first_col:
        rects.append((first_row, first_col, 1, width - first_col))
        row += 1
    if last_row > row:
        rects.append((row, 0, last_row - row, width))
    if last_col:
        rects.append((last_row, 0, 1, last_col))
    return rects


def _intersect(a: Rect, b: Rect) -> Optional[Rect]:
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return (r0, c0, r1 - r0, c1 - c0) if r1 > r0 and c1 > c0 else None


def holdings(layout: ParamLayout, rank: int, slot: int) -> list[MatrixHolding]:
    """The logical matrices ``layout`` touches and the rectangles it holds of each."""
    layout.validate()
    sr, sc, sh, sw = layout.shard_rect
    start, stop = layout.range
    local = [(sr + r, sc + c, h, w) for r, c, h, w in _range_rects(start, stop, sw)]
    out = []
    for mat in layout.matrices():
        rects = []
        for b in mat.blocks:
            for piece in local:
                hit = _intersect(piece, (b.src_row, b.src_col, b.rows, b.cols))
                if hit is None:
                    continue
                row, col, h, w = hit
                offset = (row - sr) * sw + (col - sc) - start
                rects.append(PieceRect(b.dst_row + row - b.src_row, b.dst_col + col - b.src_col, h, w, offset, sw))
        if rects:
            out.append(MatrixHolding(matrix_name(layout.key, mat), mat.shape, rank, slot, tuple(rects)))
    return out


def view_rects(layout: ParamLayout) -> list[tuple[Rect, int]]:
    """The piece as rectangles of the parameter's full view, each with its piece-buffer offset
    (row stride is the shard width). Used by checkpoints to reshard momentum."""
    sr, sc, _, sw = layout.shard_rect
    start, stop = layout.range
    return [((sr + r, sc + c, h, w), r * sw + c - start) for r, c, h, w in _range_rects(start, stop, sw)]


# ---------------------------------------------------------------------------------------------
# Layout helpers for engines that let us choose the flat-buffer order, and simulations.


@dataclass(frozen=True)
class AlignItem:
    """A parameter to place in a flat buffer: ``key``, ``numel`` and its Newton-Schulz FLOPs
    (0 for AdamW parameters, which only fill space)."""

    key: str
    numel: int
    flops: float = 0.0


@dataclass(frozen=True)
class AlignedLayout:
    """A flat-buffer order in which every parameter lies whole in one data-parallel partition.

    ``order``: parameter keys in buffer order; ``offsets``: key -> flat offset; ``partition_size``:
    elements per rank (the buffer is ``dp * partition_size``); ``rank_of``: key -> partition;
    ``padding``: unused elements per rank; ``flops``: NS FLOPs per rank."""

    order: tuple[str, ...]
    offsets: dict = field(hash=False)
    rank_of: dict = field(hash=False)
    partition_size: int
    padding: tuple[int, ...]
    flops: tuple[float, ...]


def aligned_layout(items: Sequence[AlignItem], dp: int, *, align: int = 1) -> AlignedLayout:
    """Order ``items`` so each lies whole in one of ``dp`` equal partitions.

    Muon parameters (flops > 0) are placed by longest-processing-time greedy on FLOPs (ties: fewer
    elements); the others then fill the partitions with the fewest elements. Each partition is
    padded to the largest, rounded up to ``align``. Deterministic for a given input.
    """
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("aligned_layout: duplicate parameter keys")
    flops = [0.0] * dp
    fill = [0] * dp
    members: list[list[str]] = [[] for _ in range(dp)]
    muon = sorted((it for it in items if it.flops > 0), key=lambda it: (-it.flops, -it.numel, it.key))
    rest = sorted((it for it in items if it.flops <= 0), key=lambda it: (-it.numel, it.key))
    for it in muon:
        r = min(range(dp), key=lambda i: (flops[i], fill[i], i))
        flops[r] += it.flops
        fill[r] += it.numel
        members[r].append(it.key)
    for it in rest:
        r = min(range(dp), key=lambda i: (fill[i], i))
        fill[r] += it.numel
        members[r].append(it.key)
    size = max(fill) if fill else 0
    size = -(-size // align) * align
    numel = {it.key: it.numel for it in items}
    order, offsets, rank_of = [], {}, {}
    for r in range(dp):
        pos = r * size
        for key in members[r]:
            order.append(key)
            offsets[key] = pos
            rank_of[key] = r
            pos += numel[key]
    return AlignedLayout(tuple(order), offsets, rank_of, size, tuple(size - f for f in fill), tuple(flops))


@dataclass(frozen=True)
class ParamSpec:
    """A full parameter for simulation: key, shape, split, whether Muon updates it."""

    key: str
    shape: tuple[int, ...]
    split: Optional[SplitSpec] = None
    use_muon: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _partition(params: Sequence[ParamSpec], offsets: dict, total: int, dp: int) -> list[list[ParamLayout]]:
    size = -(-total // dp)
    per_rank: list[list[ParamLayout]] = [[] for _ in range(dp)]
    for p in params:
        if not p.use_muon:
            continue
        lo, hi = offsets[p.key], offsets[p.key] + p.numel
        for r in range(lo // size, min(dp, -(-hi // size))):
            start, stop = max(lo, r * size), min(hi, (r + 1) * size)
            if stop > start:
                per_rank[r].append(ParamLayout(p.key, p.shape, p.split, None, (start - lo, stop - lo)))
    return per_rank


def flat_layouts(params: Sequence[ParamSpec], dp: int) -> list[list[ParamLayout]]:
    """DeepSpeed-style ZeRO-1: all parameters in one flat buffer, split in ``dp`` equal partitions.
    Returns, per rank, the layouts of the Muon parameters it holds pieces of."""
    offsets, pos = {}, 0
    for p in params:
        offsets[p.key], pos = pos, pos + p.numel
    return _partition(params, offsets, pos, dp)


def bucketed_layouts(params: Sequence[ParamSpec], dp: int, bucket_numel: Optional[int] = None) -> list[list[ParamLayout]]:
    """Megatron-style: parameters in reverse order fill buckets of about ``bucket_numel`` elements
    (default ``max(4e7, 1e6 * dp)``, Megatron's rule), each bucket padded to a multiple of ``dp``
    and split in ``dp`` equal shards. Returns, per rank, the Muon layouts it holds."""
    bucket_numel = bucket_numel or max(40_000_000, 1_000_000 * dp)
    per_rank: list[list[ParamLayout]] = [[] for _ in range(dp)]
    bucket: list[ParamSpec] = []
    filled = 0

    def flush():
        nonlocal bucket, filled
        if bucket:
            offsets, pos = {}, 0
            for p in bucket:
                offsets[p.key], pos = pos, pos + p.numel
            for r, layouts in enumerate(_partition(bucket, offsets, -(-pos // dp) * dp, dp)):
                per_rank[r].extend(layouts)
        bucket, filled = [], 0

    for p in reversed(list(params)):
        bucket.append(p)
        filled += p.numel
        if filled >= bucket_numel:
            flush()
    flush()
    return per_rank
