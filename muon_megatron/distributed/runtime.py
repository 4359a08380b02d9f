"""The runtime: carries out a :class:`Plan` on one rank.

Per step: pack this rank's Newton-Schulz inputs for the owners, one ``all_to_all_single`` (async;
matrices whose pieces are all local are orthogonalised while it is in flight), batched NS per
shape on the owned matrices, one ``all_to_all_single`` back with each holder's region of the
result (async; local results are applied meanwhile). Pieces travel in the NS dtype, which is what
Newton-Schulz casts to first, so the result equals NS on the full matrix in one process.
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


def _routes(items: Sequence[tuple[int, int, MatrixHolding]], world: int):
    """Order (peer, matrix, holding) by peer then matrix then slot; return routes and split sizes."""
    by_peer: dict[int, list] = defaultdict(list)
    for peer, index, h in items:
        by_peer[peer].append((index, h.slot, h))
    routes, sizes, pos = [], [0] * world, 0
    for peer in range(world):
        for index, _, h in sorted(by_peer[peer], key=lambda t: (t[0], t[1])):
            routes.append((peer, _Route(index, h, pos)))
            pos += h.numel
            sizes[peer] += h.numel
    return routes, sizes, pos


class MuonExchange:
    """The per-rank schedule of a plan: who sends what to whom, precomputed once.

    ``rank`` is this process's rank in ``group`` (None: a single process, no collectives).
    After :meth:`run`, ``orthogonalized`` lists the names of the matrices this rank
    orthogonalised in that step (tests count them across the world).
    """

    def __init__(self, plan: Plan, rank: int, group: Optional[dist.ProcessGroup] = None):
        self.plan, self.rank, self.group = plan, rank, group
        W = plan.world_size
        me = rank
        send_g, recv_g, send_r, recv_r = [], [], [], []
        self.local_sources: list[tuple[int, MatrixHolding]] = []
        self.local_returns: list[tuple[int, MatrixHolding]] = []
        for i, mp in enumerate(plan.matrices):
            for h in mp.sources:
                if h.rank == me and mp.owner == me:
                    self.local_sources.append((i, h))
                elif h.rank == me:
                    send_g.append((mp.owner, i, h))
                elif mp.owner == me:
                    recv_g.append((h.rank, i, h))
            for h in mp.returns:
                if h.rank == me and mp.owner == me:
                    self.local_returns.append((i, h))
                elif mp.owner == me:
                    send_r.append((h.rank, i, h))
                elif h.rank == me:
                    recv_r.append((mp.owner, i, h))
        self.send_gather, self.send_gather_sizes, self.send_gather_total = _routes(send_g, W)
        self.recv_gather, self.recv_gather_sizes, self.recv_gather_total = _routes(recv_g, W)
        self.send_return, self.send_return_sizes, self.send_return_total = _routes(send_r, W)
        self.recv_return, self.recv_return_sizes, self.recv_return_total = _routes(recv_r, W)
        self.owned = plan.owned(me)
        remote = {route.matrix for _, route in self.recv_gather}
        # Buckets whose matrices are complete locally can run while the gather is in flight.
        self.early, self.late = [], []
        for shape, indices in plan.buckets[me]:
            local = [i for i in indices if i not in remote]
            waiting = [i for i in indices if i in remote]
            if local:
                self.early.append((shape, local))
            if waiting:
                self.late.append((shape, waiting))
        self.communicates = W > 1 and (sum(plan.gather_elems) + sum(plan.return_elems)) > 0
        self.orthogonalized: list[str] = []
        self._ns_wall = 0.0
        self._ns_events: list = []

    @property
    def ns_seconds(self) -> float:
        """Time this rank spent in Newton-Schulz during the last :meth:`run`. On a GPU it is
        measured with CUDA events and reading it waits for them (read it when logging)."""
        if self._ns_events:
            return sum(start.elapsed_time(end) for start, end in self._ns_events) / 1e3
        return self._ns_wall

    def _exchange(self, send: torch.Tensor, recv: torch.Tensor, send_sizes, recv_sizes):
        if not self.communicates:
            return None
        return dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group, async_op=True)

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        deliver: Callable[[int, MatrixHolding, Sequence[torch.Tensor]], None],
        *,
        steps: int = 5,
        coefficients: CoefficientSpec = "moonlight",
        dtype: torch.dtype = torch.bfloat16,
        orthogonalize: Optional[Callable[..., list]] = None,
        max_batch: int = 128,
    ) -> None:
        """One exchange. ``inputs[slot]``: this rank's flat NS input for each piece (any float
        dtype). ``deliver(slot, holding, regions)`` is called once per holding of this rank with
        its part of the result: one ``rows x cols`` tensor (``dtype``) per rect of
        ``holding.rects``, in that order (views: valid during the call). ``orthogonalize``: the
        Newton-Schulz backend for a list of same-shape matrices (default
        :func:`muon_megatron.core.update.orthogonalize_batched`), at most ``max_batch`` per call."""
        backend = orthogonalize or orthogonalize_batched
        device = inputs[0].device if len(inputs) else collective_device(self.group)
        send = torch.empty(self.send_gather_total, dtype=dtype, device=device)
        for _, route in self.send_gather:
            pack(inputs[route.holding.slot], route.holding, send[route.start : route.start + route.holding.numel])
        recv = torch.empty(self.recv_gather_total, dtype=dtype, device=device)
        work = self._exchange(send, recv, self.send_gather_sizes, self.recv_gather_sizes)

        full = {i: torch.empty(self.plan.matrices[i].shape, dtype=dtype, device=device) for i in self.owned}
        for i, h in self.local_sources:  # this rank's own pieces: one copy per region, no packing
            for r in h.rects:
                full[i][r.row : r.row + r.rows, r.col : r.col + r.cols].copy_(rect_view(inputs[h.slot], r))
        results: dict[int, torch.Tensor] = {}
        self.orthogonalized = []

        self._ns_wall, self._ns_events = 0.0, []
        cuda = device.type == "cuda"

        def orthogonalize(buckets):
            for _, indices in buckets:
                for start in range(0, len(indices), max_batch):
                    chunk = indices[start : start + max_batch]
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
                    for i, O in zip(chunk, out):
                        results[i] = O
                        self.orthogonalized.append(self.plan.matrices[i].name)

        orthogonalize(self.early)
        if work is not None:
            work.wait()
        for _, route in self.recv_gather:
            place(full[route.matrix], route.holding, recv[route.start : route.start + route.holding.numel])
        orthogonalize(self.late)

        send = torch.empty(self.send_return_total, dtype=dtype, device=device)
        for _, route in self.send_return:
            extract(results[route.matrix], route.holding, send[route.start : route.start + route.holding.numel])
        recv = torch.empty(self.recv_return_total, dtype=dtype, device=device)
        work = self._exchange(send, recv, self.send_return_sizes, self.recv_return_sizes)
        for i, h in self.local_returns:  # straight from the result, no packing
            deliver(h.slot, h, [results[i][r.row : r.row + r.rows, r.col : r.col + r.cols] for r in h.rects])
        if work is not None:
            work.wait()
        for _, route in self.recv_return:
            deliver(route.holding.slot, route.holding, regions(recv[route.start : route.start + route.holding.numel],
                                                              route.holding))
