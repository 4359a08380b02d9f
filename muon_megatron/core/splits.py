"""Split specs: which logical matrices one parameter holds.

A parameter tensor is seen through a 2-D *view* (``SplitSpec.view_shape``: its memory read
row-major as ``R x C``). Each logical matrix is a list of rectangular :class:`Block` s of that view,
placed at given offsets of the logical ``(m, n)`` matrix. Specs are frozen data: the single-process
optimizer, the distributed planner and the engine adapters all read the same blocks.

Specs always describe the *full* (unsharded) parameter. Tensor-parallel shards are rectangles of
that view, which the distributed layout intersects with these blocks.

Supported: :class:`Whole` (a plain 2-D matrix), :class:`FusedQKV` (Megatron's per-query-group
``[q heads..., k, v]`` rows), :class:`GateUp` (fused SwiGLU ``gate|up``, also as interleaved
tensor-parallel shards), and :class:`ExpertStack` (E experts stacked in memory ``[E, m, n]`` or
concatenated along columns ``[m, E * n]``, each expert optionally split again by ``inner``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Block:
    """Rows ``src_row : src_row + rows`` and columns ``src_col : src_col + cols`` of the view,
    placed at ``(dst_row, dst_col)`` of the logical matrix."""

    src_row: int
    src_col: int
    dst_row: int
    dst_col: int
    rows: int
    cols: int


@dataclass(frozen=True)
class LogicalMatrix:
    """One matrix to orthogonalise on its own: ``name`` (suffix such as ``"q"`` or ``"expert3"``,
    empty for a whole parameter), its ``shape`` and the view blocks that tile it exactly."""

    name: str
    shape: tuple[int, int]
    blocks: tuple[Block, ...]

    def offset(self, row: int, col: int, prefix: str) -> "LogicalMatrix":
        name = f"{prefix}.{self.name}" if self.name else prefix
        return LogicalMatrix(
            name,
            self.shape,
            tuple(Block(b.src_row + row, b.src_col + col, b.dst_row, b.dst_col, b.rows, b.cols) for b in self.blocks),
        )


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


class SplitSpec:
    """Base class. Subclasses are frozen dataclasses implementing ``view_shape`` and ``matrices``."""

    def view_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        if len(shape) != 2:
            raise ValueError(
                f"{type(self).__name__} needs a 2-D parameter, got shape {tuple(shape)}"
            )
        return int(shape[0]), int(shape[1])

    def matrices(self, shape: Sequence[int]) -> tuple[LogicalMatrix, ...]:
        raise NotImplementedError


def _whole(rows: int, cols: int) -> LogicalMatrix:
    return LogicalMatrix("", (rows, cols), (Block(0, 0, 0, 0, rows, cols),))


@dataclass(frozen=True)
class Whole(SplitSpec):
    """The whole 2-D parameter is one matrix."""

    def matrices(self, shape):
        return (_whole(*self.view_shape(shape)),)


@dataclass(frozen=True)
class FusedQKV(SplitSpec):
    """Megatron's fused QKV weight ``[num_query_groups * (q_per_group + 2) * head_dim, hidden]``:
    per query group the rows of its ``q_per_group`` query heads, then its key head, then its value
    head. Split into three matrices ``q`` (all query heads), ``k`` and ``v`` (all groups), as in
    Moonlight's separate q/k/v projections. Heads are not split further (the paper found per-head
    updates too large)."""

    num_query_groups: int
    q_per_group: int
    head_dim: int

    def __post_init__(self):
        for field in ("num_query_groups", "q_per_group", "head_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"FusedQKV.{field} must be >= 1, got {getattr(self, field)}")

    def matrices(self, shape):
        R, C = self.view_shape(shape)
        g, qpg, d = self.num_query_groups, self.q_per_group, self.head_dim
        per_group = (qpg + 2) * d
        if R != g * per_group:
            raise ValueError(
                f"FusedQKV(num_query_groups={g}, q_per_group={qpg}, head_dim={d}) expects "
                f"{g * per_group} rows, the parameter has {R}; check the attention config"
            )
        q = tuple(Block(i * per_group, 0, i * qpg * d, 0, qpg * d, C) for i in range(g))
        k = tuple(Block(i * per_group + qpg * d, 0, i * d, 0, d, C) for i in range(g))
        v = tuple(Block(i * per_group + (qpg + 1) * d, 0, i * d, 0, d, C) for i in range(g))
        return (
            LogicalMatrix("q", (g * qpg * d, C), q),
            LogicalMatrix("k", (g * d, C), k),
            LogicalMatrix("v", (g * d, C), v),
        )


@dataclass(frozen=True)
class GateUp(SplitSpec):
    """Fused SwiGLU ``gate|up``: along ``axis`` the parameter is ``num_shards`` equal chunks (the
    tensor-parallel shards, concatenated), each ``[gate part; up part]``. Gives ``gate`` and ``up``.
    With ``num_shards=1`` it is simply the two halves."""

    num_shards: int = 1
    axis: int = 0

    def __post_init__(self):
        if self.num_shards < 1 or self.axis not in (0, 1):
            raise ValueError(f"GateUp needs num_shards >= 1 and axis 0 or 1, got {self}")

    def matrices(self, shape):
        R, C = self.view_shape(shape)
        length = (R, C)[self.axis]
        if length % (2 * self.num_shards):
            raise ValueError(
                f"GateUp(num_shards={self.num_shards}, axis={self.axis}): dimension {self.axis} "
                f"of shape {(R, C)} is not divisible by {2 * self.num_shards}"
            )
        half = length // (2 * self.num_shards)
        out = []
        for part, name in enumerate(("gate", "up")):
            blocks = []
            for s in range(self.num_shards):
                src = s * 2 * half + part * half
                dst = s * half
                if self.axis == 0:
                    blocks.append(Block(src, 0, dst, 0, half, C))
                else:
                    blocks.append(Block(0, src, 0, dst, R, half))
            full = half * self.num_shards
            out.append(LogicalMatrix(name, (full, C) if self.axis == 0 else (R, full), tuple(blocks)))
        return tuple(out)


@dataclass(frozen=True)
class ExpertStack(SplitSpec):
    """``num_experts`` expert matrices in one parameter, each orthogonalised on its own.

    ``layout="stacked"``: memory is ``[E, m, n]`` (a 3-D tensor, or any tensor whose memory is that,
    such as Megatron's legacy GroupedMLP weights); ``expert_shape=(m, n)`` is needed when the tensor
    is not 3-D. ``layout="columns"``: a 2-D ``[m, E * n]`` tensor of experts side by side.
    ``inner`` splits each expert again (e.g. ``GateUp()`` for fused expert fc1).
    """

    num_experts: int
    layout: str = "stacked"
    expert_shape: Optional[tuple[int, int]] = None
    inner: Optional[SplitSpec] = None

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"ExpertStack.num_experts must be >= 1, got {self.num_experts}")
        if self.layout not in ("stacked", "columns"):
            raise ValueError(f"ExpertStack.layout must be 'stacked' or 'columns', got {self.layout!r}")

    def _expert_shape(self, shape) -> tuple[int, int]:
        E = self.num_experts
        if self.layout == "columns":
            R, C = SplitSpec.view_shape(self, shape)
            if C % E:
                raise ValueError(f"ExpertStack(columns): {C} columns do not divide into {E} experts")
            return R, C // E
        if self.expert_shape is not None:
            m, n = self.expert_shape
        elif len(shape) == 3:
            m, n = int(shape[1]), int(shape[2])
        else:
            raise ValueError(
                f"ExpertStack(stacked) on a {len(shape)}-D parameter of shape {tuple(shape)} needs "
                "expert_shape=(rows, cols)"
            )
        if len(shape) == 3 and int(shape[0]) != E:
            raise ValueError(f"ExpertStack(num_experts={E}) but the parameter stacks {shape[0]} experts")
        if E * m * n != _numel(shape):
            raise ValueError(
                f"ExpertStack: {E} experts of {m} x {n} do not fill a parameter of shape {tuple(shape)}"
            )
        return m, n

    def view_shape(self, shape):
        m, n = self._expert_shape(shape)
        return (self.num_experts * m, n) if self.layout == "stacked" else (m, self.num_experts * n)

    def matrices(self, shape):
        m, n = self._expert_shape(shape)
        inner = (self.inner or Whole()).matrices((m, n))
        out = []
        for e in range(self.num_experts):
            row, col = (e * m, 0) if self.layout == "stacked" else (0, e * n)
            out.extend(mat.offset(row, col, f"expert{e}") for mat in inner)
        return tuple(out)


def default_split(shape: Sequence[int]) -> SplitSpec:
    """The split used when none is declared: 2-D -> :class:`Whole`, 3-D -> :class:`ExpertStack`."""
    if len(shape) == 2:
        return Whole()
    if len(shape) == 3:
        return ExpertStack(int(shape[0]))
    raise ValueError(f"no default split for a {len(shape)}-D parameter of shape {tuple(shape)}")


def check_tiling(matrices: Sequence[LogicalMatrix], view: tuple[int, int], where: str) -> None:
    """Raise ValueError unless the blocks lie inside ``view``, tile each matrix exactly and do not
    overlap one another in the view. ``where`` names the parameter in the message."""
    R, C = view
    claimed = 0
    for mat in matrices:
        m, n = mat.shape
        area = 0
        for b in mat.blocks:
            if b.rows < 1 or b.cols < 1 or b.src_row < 0 or b.src_col < 0 or b.src_row + b.rows > R or b.src_col + b.cols > C:
                raise ValueError(f"{where}: block {b} of matrix {mat.name!r} lies outside the view {view}")
            if b.dst_row + b.rows > m or b.dst_col + b.cols > n:
                raise ValueError(f"{where}: block {b} lies outside matrix {mat.name!r} of shape {mat.shape}")
            area += b.rows * b.cols
        if area != m * n:
            raise ValueError(f"{where}: blocks of matrix {mat.name!r} cover {area} of {m * n} elements")
        claimed += area
    if claimed != R * C:
        raise ValueError(
            f"{where}: the split covers {claimed} of the parameter's {R * C} elements; every element "
            "must belong to exactly one logical matrix"
        )


def gather_matrix(view: torch.Tensor, mat: LogicalMatrix) -> torch.Tensor:
    """Copy logical matrix ``mat`` out of a 2-D ``view`` of the parameter (a new tensor)."""
    if len(mat.blocks) == 1 and mat.blocks[0].rows == view.shape[0] and mat.blocks[0].cols == view.shape[1]:
        return view.clone()
    out = view.new_empty(mat.shape)
    for b in mat.blocks:
        out[b.dst_row : b.dst_row + b.rows, b.dst_col : b.dst_col + b.cols] = view[
            b.src_row : b.src_row + b.rows, b.src_col : b.src_col + b.cols
        ]
    return out


_SPLIT_TYPES = {cls.__name__: cls for cls in (Whole, FusedQKV, GateUp, ExpertStack)}


def split_to_dict(spec: SplitSpec) -> dict:
    """A plain-data form of ``spec`` (str, int, tuple, nested dict), for checkpoints that must load
    with ``torch.load(weights_only=True)``. :func:`split_from_dict` inverts it exactly."""
    name = type(spec).__name__
    if _SPLIT_TYPES.get(name) is not type(spec):
        raise ValueError(f"cannot serialise split spec {spec!r}: known types are {sorted(_SPLIT_TYPES)}")
    out: dict = {"type": name}
    for field in getattr(spec, "__dataclass_fields__", {}):
        value = getattr(spec, field)
        out[field] = split_to_dict(value) if isinstance(value, SplitSpec) else value
    return out


def split_from_dict(data: dict) -> SplitSpec:
    """The :class:`SplitSpec` that :func:`split_to_dict` described; ValueError for an unknown type."""
    kwargs = dict(data)
    name = kwargs.pop("type", None)
    if name not in _SPLIT_TYPES:
        raise ValueError(f"unknown split type {name!r}; valid types: {sorted(_SPLIT_TYPES)}")
    for field, value in kwargs.items():
        if isinstance(value, dict):
            kwargs[field] = split_from_dict(value)
        elif isinstance(value, list):  # e.g. expert_shape after a JSON round trip
            kwargs[field] = tuple(value)
    return _SPLIT_TYPES[name](**kwargs)
