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

from ..core.newton_schulz import ns_flops
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
    def kept_range(self) -> tuple[int, int]:
        """``flat_range`` resolved: ``(start, stop)`` of the local tensor's elements kept here."""
        _, _, h, w = self.shard_rect
        return self.flat_range if self.flat_range is not None else (0, h * w)

    @property
    def numel(self) -> int:
        start, stop = self.kept_range
        return stop - start

    def matrices(self) -> tuple[LogicalMatrix, ...]:
        return _matrices(self.split, self.full_shape, self.key)

    def validate(self) -> None:
        """ValueError naming the parameter if the shard or range do not fit its view."""
        R, C = self.view_shape
        r, c, h, w = self.shard_rect
        if h < 1 or w < 1 or r < 0 or c < 0 or r + h > R or c + w > C:
            raise ValueError(f"parameter {self.key!r}: shard {self.shard} lies outside its view {(R, C)}")
        start, stop = self.kept_range
        if not 0 <= start <= stop <= h * w:
            raise ValueError(
                f"parameter {self.key!r}: flat_range {self.flat_range} outside its local tensor of {h * w} elements"
            )
        self.matrices()


def tensor_parallel_shard(full_shape: Sequence[int], partition_dim: Optional[int], size: int, rank: int) -> Optional[Rect]:
    """Shard ``rank``'s rectangle ``(row, col, rows, cols)`` of a 2-D weight of ``full_shape`` cut
    along ``partition_dim`` (0: rows, 1: columns) into ``size`` equal tensor-parallel shards; None
    when the weight is not cut (``partition_dim`` None or ``size`` 1). The one tensor-parallel
    geometry of the package: both engine adapters and the planner describe shards with it.
    ValueError for another cut, a rank out of range or a size that does not divide the dimension."""
    rows, cols = (int(v) for v in full_shape)
    if partition_dim is None or size == 1:
        return None
    if partition_dim not in (0, 1) or not 0 <= rank < size or (rows, cols)[partition_dim] % size:
        raise ValueError(
            f"cannot cut a {rows} x {cols} weight along dim {partition_dim} into {size} tensor-parallel shards "
            f"(rank {rank}): 2-D weights cut evenly along dim 0 or 1 only"
        )
    if partition_dim == 0:
        h = rows // size
        return (rank * h, 0, h, cols)
    w = cols // size
    return (0, rank * w, rows, w)


def tensor_parallel_full_shape(local_shape: Sequence[int], partition_dim: Optional[int], size: int) -> tuple[int, int]:
    """The full shape of a 2-D weight whose tensor-parallel shard has ``local_shape``."""
    full = [int(v) for v in local_shape]
    if partition_dim is not None and size > 1:
        full[partition_dim] *= size
    return tuple(full)


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
    start, stop = layout.kept_range
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
    start, stop = layout.kept_range
    return [((sr + r, sc + c, h, w), r * sw + c - start) for r, c, h, w in _range_rects(start, stop, sw)]


# ---------------------------------------------------------------------------------------------
# Layout helpers for engines that let us choose the flat-buffer order, and simulations.


@dataclass(frozen=True)
class AlignItem:
    """A parameter to place in a flat buffer: ``key``, ``numel`` and its Newton-Schulz FLOPs
    (0 for AdamW parameters, which only fill space). ``parts``: optionally, ``(numel, flops)`` of
    its logical matrices in memory order, when each is a contiguous run (a whole matrix, halves
    of ``gate|up``, stacked experts); it lets an oversized item be balanced matrix by matrix."""

    key: str
    numel: int
    flops: float = 0.0
    parts: tuple = ()

    @classmethod
    def of(cls, key: str, shape: Sequence[int], split: Optional[SplitSpec] = None) -> "AlignItem":
        """The item of a whole Muon parameter: FLOPs summed over its logical matrices, and
        ``parts`` when each matrix is one run of whole rows of the view (contiguous in memory)."""
        split = split or default_split(shape)
        mats = split.matrices(shape)
        cols = split.view_shape(shape)[1]
        contiguous = all(len(m.blocks) == 1 and m.blocks[0].cols == cols for m in mats)
        parts = tuple((m.shape[0] * m.shape[1], ns_flops(*m.shape)) for m in mats) if contiguous else ()
        return cls(key, math.prod(int(v) for v in shape), sum(ns_flops(*m.shape) for m in mats), parts)


@dataclass(frozen=True)
class AlignedLayout:
    """A flat-buffer order in which every parameter but the oversized ones lies whole in one
    data-parallel partition.

    ``order``: keys in buffer order; ``offsets``: key -> flat offset; ``partition_size``: elements
    per rank (the buffer is ``dp * partition_size``); ``rank_of``: key -> partition (None for an
    oversized item, which is cut over consecutive partitions and gathered as usual); ``padding``:
    unused elements per rank; ``flops``: expected NS FLOPs per rank."""

    order: tuple[str, ...]
    offsets: dict = field(hash=False)
    rank_of: dict = field(hash=False)
    partition_size: int
    padding: tuple[int, ...]
    flops: tuple[float, ...]

    def layouts(self, params: Sequence["ParamSpec"]) -> list[list[ParamLayout]]:
        """Per rank, the :class:`ParamLayout` s of its pieces (whole items, or ranges of the
        oversized ones)."""
        return _partition(params, self.offsets, self.partition_size * len(self.padding), len(self.padding))


def aligned_layout(items: Sequence[AlignItem], dp: int, *, align: int = 1) -> AlignedLayout:
    """Order ``items`` so that each lies whole in one of ``dp`` equal partitions, balanced by FLOPs.

    Meant for a buffer of Muon parameters only (a Megatron bucket or a DeepSpeed param group of
    their own; AdamW parameters keep the engine's usual flat sharding in theirs), one item per
    unit that may be placed on its own: a parameter, or each expert where experts are separate
    parameters. An item heavier than a rank's fair share of FLOPs (say a fused dense ``gate|up``
    at high DP) cannot be balanced whole: such *oversized* items go first, cut over consecutive
    partitions, and their matrices are gathered from those few ranks as in the default layout.
    The others are placed by longest-processing-time greedy on FLOPs (ties: fewer elements) into
    partitions with room; items with flops 0 fill the emptiest partitions. The partition size
    starts at the fair share of elements and grows by 2 % until everything fits. Deterministic.
    """
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("aligned_layout: duplicate parameter keys")
    total_flops = sum(it.flops for it in items)
    total_numel = sum(it.numel for it in items)
    big = [it for it in items if dp > 1 and it.flops > total_flops / dp]
    muon = sorted((it for it in items if it.flops > 0 and it not in big), key=lambda it: (-it.flops, -it.numel, it.key))
    rest = sorted((it for it in items if it.flops <= 0), key=lambda it: (-it.numel, it.key))
    largest = max([it.numel for it in muon + rest] + [max((n for n, _ in it.parts), default=0) for it in big])
    size = first = max(-(-total_numel // dp), largest, 1)
    best = None
    # Grow the partition (more padding) while capacity, not FLOPs, decides the placement: stop at
    # 1.05 imbalance or 25 % growth, keeping the best placement seen.
    while size <= 1.25 * first or best is None:
        size = -(-size // align) * align
        placed = _place(big, muon, rest, dp, size)
        if placed is not None:
            imbalance = max(placed[0]) / (sum(placed[0]) / dp) if sum(placed[0]) else 1.0
            if best is None or imbalance < best[0] - 1e-9:
                best = (imbalance, size, placed)
            if imbalance <= 1.05:
                break
        size = int(size * 1.02) + 1
    _, size, placed = best
    flops, fill, offsets, rank_of = placed
    order = tuple(sorted(offsets, key=lambda k: offsets[k]))
    return AlignedLayout(order, offsets, rank_of, size, tuple(size - f for f in fill), tuple(flops))


def _big_start(pos: int, item: AlignItem, size: int) -> int:
    """Where an oversized item starts: at ``pos`` or later, so that a partition boundary falls on
    the part boundary nearest its middle (each half then lies in its own partition)."""
    cuts, acc = [], 0
    for numel, _ in item.parts[:-1]:
        acc += numel
        cuts.append(acc)
    if not cuts:
        return pos
    cut = min(cuts, key=lambda c: (abs(c - item.numel / 2), c))
    return max(pos, -(-(pos + cut) // size) * size - cut)


def _place(big, muon, rest, dp, size):
    """Greedy placement at one partition size: (flops, fill, members) or None if it does not fit."""
    flops, fill = [0.0] * dp, [0] * dp
    pos = 0
    offsets: dict = {}
    rank_of: dict = {}
    for it in big:  # cut over consecutive partitions, after padding so the cut falls between matrices
        start = _big_start(pos, it, size)
        offsets[it.key], rank_of[it.key] = start, None
        # Each matrix is expected on the partition holding most of it (the planner's tie-break);
        # without parts, the FLOPs are spread in proportion to the elements.
        pos = start
        for numel, f in it.parts or [(it.numel, it.flops)]:
            shares = {r: min(pos + numel, (r + 1) * size) - max(pos, r * size)
                      for r in range(pos // size, min(dp, -(-(pos + numel) // size)))}
            if it.parts:
                flops[max(shares, key=lambda r: (shares[r], -r))] += f
            else:
                for r, share in shares.items():
                    flops[r] += f * share / numel
            pos += numel
    if pos > dp * size:
        return None
    # Free space per partition: before the first oversized item and after the last (the padding
    # in front of an oversized item stays free for whole items).
    taken_lo = min(offsets.values()) if offsets else 0
    free = []  # per partition: list of [next free position, end]
    for r in range(dp):
        lo, hi = r * size, (r + 1) * size
        segments = []
        if lo < taken_lo:
            segments.append([lo, min(hi, taken_lo)])
        if hi > pos:
            segments.append([max(lo, pos), hi])
        free.append(segments)
        fill[r] = size - sum(b - a for a, b in segments)

    def put(it, choose):
        room = [r for r in range(dp) if any(b - a >= it.numel for a, b in free[r])]
        if not room:
            return False
        r = choose(room)
        segment = next(seg for seg in free[r] if seg[1] - seg[0] >= it.numel)
        offsets[it.key], rank_of[it.key] = segment[0], r
        segment[0] += it.numel
        fill[r] += it.numel
        flops[r] += it.flops
        return True

    for it in muon:
        if not put(it, lambda room: min(room, key=lambda i: (flops[i], fill[i], i))):
            return None
    for it in rest:
        if not put(it, lambda room: min(room, key=lambda i: (fill[i], i))):
            return None
    return flops, fill, offsets, rank_of


@dataclass(frozen=True)
class ParamSpec:
    """A full parameter for simulation: key, shape, split, whether Muon updates it."""

    key: str
    shape: tuple[int, ...]
    split: Optional[SplitSpec] = None
    use_muon: bool = True

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        if self.use_muon and self.split is None:
            object.__setattr__(self, "split", default_split(self.shape))

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
