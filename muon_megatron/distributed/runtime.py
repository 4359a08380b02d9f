"""The runtime: carries out a :class:`Plan` on one rank.

Each rank's owned matrices form *chunks*: same-shape buckets of the plan, cut to at most
``max_batch`` matrices, the chunks that need no remote piece first. Per *stage*, one asynchronous
``all_to_all_single`` gathers the pieces its matrices miss to their owners (the chunks that need
nothing remote run while it is in flight), the owners orthogonalise the chunks (batched
Newton-Schulz), and one asynchronous ``all_to_all_single`` returns each holder its region of the
result (local results are applied meanwhile). By default there is one stage; with ``pipeline``
chunk ``s`` of every rank forms stage ``s`` (every rank derives the same stages from the same
plan) and each stage's collectives are posted one stage ahead, so stage ``s + 1``'s gather and
stage ``s``'s return travel while stage ``s + 1`` is orthogonalised: for links slow against
Newton-Schulz. Measured on two H200s over NVLink (about 250 GB/s for these messages) the single
stage was faster (benchmarks/results/two_gpu_h200x2.md). A stage in which no rank sends anything
skips its collective (all ranks know it from the plan). Pieces travel in the NS dtype, which is
what Newton-Schulz casts to first, so the result equals NS on the full matrix in one process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.newton_schulz import CoefficientSpec
from ..core.update import orthogonalize_batched
from .comm import collective_device
from .layout import MatrixHolding, PieceRect
from .plan import Plan


def rect_view(buf: torch.Tensor, rect: PieceRect) -> torch.Tensor:
    """The ``rows x cols`` strided view of a flat piece buffer that ``rect`` describes."""
    span = (rect.rows - 1) * rect.stride + rect.cols
    return buf.narrow(0, rect.offset, span).as_strided((rect.rows, rect.cols), (rect.stride, 1))


def pack(buf: torch.Tensor, holding: MatrixHolding, out: torch.Tensor) -> None:
    """Copy the holding's regions of ``buf`` into the flat ``out`` (rect by rect, row-major)."""
    pos = 0
    for r in holding.rects:
        out[pos : pos + r.numel].view(r.rows, r.cols).copy_(rect_view(buf, r))
        pos += r.numel


def place(matrix: torch.Tensor, holding: MatrixHolding, data: torch.Tensor) -> None:
    """Write packed ``data`` of ``holding`` into the full ``matrix`` at its regions."""
    pos = 0
    for r in holding.rects:
        matrix[r.row : r.row + r.rows, r.col : r.col + r.cols] = data[pos : pos + r.numel].view(r.rows, r.cols)
        pos += r.numel


def regions(data: torch.Tensor, holding: MatrixHolding) -> list[torch.Tensor]:
    """Packed ``data`` of ``holding`` as one ``rows x cols`` view per rect (in ``holding.rects`` order)."""
    out, pos = [], 0
    for r in holding.rects:
        out.append(data[pos : pos + r.numel].view(r.rows, r.cols))
        pos += r.numel
    return out


def extract(matrix: torch.Tensor, holding: MatrixHolding, out: torch.Tensor) -> None:
    """Copy the holding's regions of the full ``matrix`` into the flat ``out``."""
    pos = 0
    for r in holding.rects:
        out[pos : pos + r.numel].view(r.rows, r.cols).copy_(matrix[r.row : r.row + r.rows, r.col : r.col + r.cols])
        pos += r.numel


@dataclass(frozen=True)
class _Route:
    """One holding's traffic in an exchange: which matrix, which holding, where in the buffer."""

    matrix: int
    holding: MatrixHolding
    start: int


@dataclass(frozen=True)
class _Traffic:
    """One ``all_to_all_single`` seen from this rank: what it sends and receives, where in the
    flat send and receive buffers, and the split sizes per peer."""

    send: tuple
    send_sizes: tuple
    send_total: int
    recv: tuple
    recv_sizes: tuple
    recv_total: int
    active: bool  # whether any rank sends anything in it (else the collective is skipped)


def _routes(items: Sequence[tuple[int, int, MatrixHolding]], world: int):
    """Order (peer, matrix, holding) by peer then matrix then slot; return routes and split sizes."""
    by_peer: dict[int, list] = defaultdict(list)
    for peer, index, h in items:
        by_peer[peer].append((index, h.slot, h))
    routes, sizes, pos = [], [0] * world, 0
    for peer in range(world):
        for index, _, h in sorted(by_peer[peer], key=lambda t: (t[0], t[1])):
            routes.append(_Route(index, h, pos))
            pos += h.numel
            sizes[peer] += h.numel
    return tuple(routes), tuple(sizes), pos


def _chunks(plan: Plan, rank: int, max_batch: int) -> list[tuple[tuple[int, ...], bool]]:
    """``rank``'s owned matrices as Newton-Schulz chunks ``(matrix indices, needs remote pieces)``:
    each bucket of the plan cut into near-equal chunks of at most ``max_batch``; the chunks whose
    sources are all the owner's own first (they can run before anything arrives), then the
    others, each group in the plan's bucket order."""
    local, remote = [], []
    for _, indices in plan.buckets[rank]:
        pieces = -(-len(indices) // max_batch)
        size = -(-len(indices) // pieces)
        for start in range(0, len(indices), size):
            chunk = tuple(indices[start : start + size])
            needs = any(h.rank != rank for i in chunk for h in plan.matrices[i].sources)
            (remote if needs else local).append((chunk, needs))
    return local + remote


class MuonExchange:
    """The per-rank schedule of a plan: who sends what to whom in each stage, precomputed once.

    ``rank`` is this process's rank in ``group`` (None: a single process, no collectives);
    ``max_batch`` bounds the matrices of one Newton-Schulz call (a chunk). ``pipeline``: one stage
    per chunk, each stage's collectives posted one stage ahead (see the module docstring); False
    (default): one stage for everything, one gather and one return per step, the chunks that need
    nothing remote orthogonalised while the gather is in flight. After :meth:`run`,
    ``orthogonalized`` lists the names of the matrices this rank orthogonalised in that step (tests
    count them across the world).
    """

    def __init__(self, plan: Plan, rank: int, group: Optional[dist.ProcessGroup] = None, *, max_batch: int = 128,
                 pipeline: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.plan, self.rank, self.group, self.pipeline = plan, rank, group, pipeline
        W, me = plan.world_size, rank
        chunks = [_chunks(plan, r, max_batch) for r in range(W)]
        if pipeline:
            stage_of = {i: s for r in range(W) for s, (chunk, _) in enumerate(chunks[r]) for i in chunk}
            self.stage_chunks = [[c] for c in chunks[me]]
            stages = max((len(c) for c in chunks), default=0)
        else:
            stage_of = {i: 0 for i in range(len(plan.matrices))}
            self.stage_chunks = [chunks[me]]
            stages = 1
        self.stage_chunks += [[] for _ in range(stages - len(self.stage_chunks))]
        gathers = [[] for _ in range(stages)]  # per stage: (sender, receiver, matrix, holding)
        returns = [[] for _ in range(stages)]
        self.local_sources: list[tuple[int, MatrixHolding]] = []
        self.local_returns: dict[int, list[MatrixHolding]] = defaultdict(list)
        for i, mp in enumerate(plan.matrices):
            s = stage_of[i]
            for h in mp.sources:
                if h.rank == mp.owner == me:
                    self.local_sources.append((i, h))
                elif h.rank != mp.owner:
                    gathers[s].append((h.rank, mp.owner, i, h))
            for h in mp.returns:
                if h.rank == mp.owner == me:
                    self.local_returns[i].append(h)
                elif h.rank != mp.owner:
                    returns[s].append((mp.owner, h.rank, i, h))
        self.gathers = [self._traffic(moves, W) for moves in gathers]
        self.returns = [self._traffic(moves, W) for moves in returns]
        self.owned = plan.owned(me)
        self.orthogonalized: list[str] = []
        self._ns_wall = 0.0
        self._ns_events: list = []

    def _traffic(self, moves, world: int) -> _Traffic:
        me = self.rank
        send = _routes([(dst, i, h) for src, dst, i, h in moves if src == me], world)
        recv = _routes([(src, i, h) for src, dst, i, h in moves if dst == me], world)
        return _Traffic(*send, *recv, active=world > 1 and bool(moves))

    @property
    def stages(self) -> int:
        return len(self.gathers)

    @property
    def ns_seconds(self) -> float:
        """Time this rank spent in Newton-Schulz during the last :meth:`run`. On a GPU it is
        measured with CUDA events and reading it waits for them (read it when logging)."""
        if self._ns_events:
            return sum(start.elapsed_time(end) for start, end in self._ns_events) / 1e3
        return self._ns_wall

    def _post(self, traffic: _Traffic, send: torch.Tensor, recv: torch.Tensor):
        if not traffic.active:
            return None
        return dist.all_to_all_single(recv, send, list(traffic.recv_sizes), list(traffic.send_sizes), group=self.group,
                                      async_op=True)

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        deliver: Callable[[Sequence[tuple[int, MatrixHolding, Sequence[torch.Tensor]]]], None],
        *,
        steps: int = 5,
        coefficients: CoefficientSpec = "moonlight",
        dtype: torch.dtype = torch.bfloat16,
        orthogonalize: Optional[Callable[..., list]] = None,
    ) -> None:
        """One exchange. ``inputs[slot]``: this rank's flat NS input for each piece (any float
        dtype). ``deliver(items)`` receives this rank's parts of the result in batches, each item
        ``(slot, holding, regions)``: one ``rows x cols`` tensor (``dtype``) per rect of
        ``holding.rects``, in that order (views: valid during the call); every holding of this
        rank comes exactly once. ``orthogonalize``: the Newton-Schulz backend for a list of
        same-shape matrices (default :func:`muon_megatron.core.update.orthogonalize_batched`)."""
        backend = orthogonalize or orthogonalize_batched
        device = inputs[0].device if len(inputs) else collective_device(self.group)
        full = {i: torch.empty(self.plan.matrices[i].shape, dtype=dtype, device=device) for i in self.owned}
        # this rank's own pieces: one multi-tensor copy of every region, no packing
        targets, sources = [], []
        for i, h in self.local_sources:
            for r in h.rects:
                targets.append(full[i][r.row : r.row + r.rows, r.col : r.col + r.cols])
                sources.append(rect_view(inputs[h.slot], r))
        if targets:
            torch._foreach_copy_(targets, sources)
        self.orthogonalized = []
        self._ns_wall, self._ns_events = 0.0, []
        cuda = device.type == "cuda"

        def post_gather(s):
            traffic = self.gathers[s]
            send = torch.empty(traffic.send_total, dtype=dtype, device=device)
            for route in traffic.send:
                pack(inputs[route.holding.slot], route.holding, send[route.start : route.start + route.holding.numel])
            recv = torch.empty(traffic.recv_total, dtype=dtype, device=device)
            return send, recv, self._post(traffic, send, recv)  # the send buffer lives until the wait

        def newton_schulz(chunk, results):
            if cuda:
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
            else:
                began = time.perf_counter()
            out = backend([full[i] for i in chunk], steps=steps, coefficients=coefficients, dtype=dtype)
            if cuda:
                events[1].record()
                self._ns_events.append(events)
            else:
                self._ns_wall += time.perf_counter() - began
            self.orthogonalized.extend(self.plan.matrices[i].name for i in chunk)
            results.update(zip(chunk, out))

        pending_returns = []
        gather = post_gather(0) if self.stages else None
        for s in range(self.stages):
            following = post_gather(s + 1) if s + 1 < self.stages else None
            results: dict[int, torch.Tensor] = {}
            chunks = self.stage_chunks[s]
            for chunk, _ in (c for c in chunks if not c[1]):  # nothing to wait for
                newton_schulz(chunk, results)
            _, recv, work = gather
            if work is not None:
                work.wait()
            for route in self.gathers[s].recv:
                place(full[route.matrix], route.holding, recv[route.start : route.start + route.holding.numel])
            for chunk, _ in (c for c in chunks if c[1]):
                newton_schulz(chunk, results)
            traffic = self.returns[s]
            send = torch.empty(traffic.send_total, dtype=dtype, device=device)
            for route in traffic.send:
                extract(results[route.matrix], route.holding, send[route.start : route.start + route.holding.numel])
            back = torch.empty(traffic.recv_total, dtype=dtype, device=device)
            pending_returns.append((s, send, back, self._post(traffic, send, back)))
            deliver([(h.slot, h, [results[i][r.row : r.row + r.rows, r.col : r.col + r.cols] for r in h.rects])
                     for i in results for h in self.local_returns[i]])  # straight from the result
            gather = following
        for s, _, back, work in pending_returns:
            if work is not None:
                work.wait()
            deliver([(route.holding.slot, route.holding,
                      regions(back[route.start : route.start + route.holding.numel], route.holding))
                     for route in self.returns[s].recv])
