"""``DistributedMuon``: Moonlight's Muon over pieces of matrices spread across ranks.

A ``torch.optim.Optimizer`` whose tensors are this rank's pieces: tensor-parallel shards, ZeRO-1
flat partitions (one tensor may hold pieces of many parameters), or whole parameters. Muon groups
say where each tensor's pieces belong through ``layouts`` (one entry per tensor: a
:class:`ParamLayout`, or a list of ``(ParamLayout, flat offset in the tensor)``). At construction
every rank all-gathers the holdings and computes the same :class:`Plan`; each step then runs the
momentum on local pieces, the :class:`MuonExchange`, and scale, weight decay and lr locally.

Promise: after any number of steps every rank's pieces equal what :class:`muon_megatron.Muon`
computes on the full matrices in one process, within float rounding (bitwise for the element-wise
parts; Newton-Schulz batches may round differently). Each matrix is orthogonalised once per step.
Momentum exists only for the local pieces.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..core.base import MuonBase
from ..core.update import apply_orthogonal_, decay_, momentum_, update_scale
from .comm import any_rank, collective_device
from .layout import MatrixHolding, ParamLayout, PieceRect, holdings, view_rects
from .plan import Plan, PlanError, make_plan
from .runtime import MuonExchange, rect_view

logger = logging.getLogger(__name__)

_NS_KEYS = ("ns_steps", "ns_coefficients", "ns_dtype")


def _normalise_layouts(entry, tensor: torch.Tensor, where: str) -> list[tuple[ParamLayout, int]]:
    pieces = [(entry, 0)] if isinstance(entry, ParamLayout) else [(lay, int(off)) for lay, off in entry]
    for lay, off in pieces:
        if not isinstance(lay, ParamLayout):
            raise ValueError(f"{where}: layouts entries must be ParamLayout or (ParamLayout, offset), got {lay!r}")
        if off < 0 or off + lay.numel > tensor.numel():
            raise ValueError(
                f"{where}: piece of {lay.key!r} at offset {off} with {lay.numel} elements does not fit a "
                f"tensor of {tensor.numel()} elements"
            )
    return pieces


class DistributedMuon(MuonBase):
    """Muon over a process group; AdamW (plain, local) for ``use_muon=False`` groups.

    Arguments are :class:`muon_megatron.core.base.MuonBase`'s plus ``process_group`` (None: the
    default group when torch.distributed is initialised, else a single process), ``plan_owners``
    (:func:`make_plan`'s ``owners``: "holders" or "any") and ``pipeline_exchange``
    (:class:`MuonExchange`'s ``pipeline``: the exchange in one stage per Newton-Schulz chunk,
    posted one stage ahead, for links slow against Newton-Schulz). Muon groups need
    ``layouts``; every rank of ``process_group`` must construct the optimizer (it is collective).
    Newton-Schulz settings (steps, coefficients, dtype) must be the same for all Muon groups.
    ``ns_device``: where the Newton-Schulz inputs travel and are orthogonalised when the tensors
    live elsewhere (optimizer state offloaded to the CPU, Newton-Schulz on the GPU); None: the
    tensors' own device. Momentum, weight decay and the update stay on the tensors' device.
    """

    RUN_KEYS = ("layouts", "names")

    def __init__(self, params, *args, process_group: Optional[dist.ProcessGroup] = None, plan_owners: str = "holders",
                 ns_device: Optional[torch.device] = None, pipeline_exchange: bool = False, **kwargs):
        self.group = process_group
        self.plan_owners = plan_owners
        self.pipeline_exchange = pipeline_exchange
        self.ns_device = torch.device(ns_device) if ns_device is not None else None
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        self.world_size = dist.get_world_size(process_group) if self.distributed else 1
        super().__init__(params, *args, **kwargs)
        self.plan, self.exchange = self._build_plan()

    # -- construction ---------------------------------------------------------------------------

    def _check_group(self, group: dict, index: int) -> None:
        if not group["use_muon"]:
            if "layouts" in group:
                raise ValueError("a use_muon=False (AdamW) group takes no 'layouts'")
            return
        if "layouts" not in group or len(group["layouts"]) != len(group["params"]):
            raise ValueError(
                "each Muon param group of DistributedMuon needs 'layouts': one ParamLayout (or list of "
                "(ParamLayout, offset)) per tensor in 'params'"
            )
        group["layouts"] = [
            _normalise_layouts(entry, p, f"param group {index}, tensor {i}")
            for i, (entry, p) in enumerate(zip(group["layouts"], group["params"]))
        ]
        for p in group["params"]:
            if not p.is_contiguous():
                raise ValueError("DistributedMuon needs contiguous tensors (pieces are flat ranges of them)")

    def _slots(self):
        """(group index, group, tensor, layout, offset) for every local piece, in slot order."""
        for gi, group in enumerate(self.param_groups):
            if group["use_muon"]:
                for p, pieces in zip(group["params"], group["layouts"]):
                    for layout, offset in pieces:
                        yield gi, group, p, layout, offset

    def _build_plan(self) -> tuple[Plan, MuonExchange]:
        muon_groups = [g for g in self.param_groups if g["use_muon"]]
        ns = {k: (muon_groups[0][k] if muon_groups else self.defaults[k]) for k in _NS_KEYS}
        for g in muon_groups:
            if any(g[k] != ns[k] for k in _NS_KEYS):
                raise ValueError(f"all Muon groups must share {_NS_KEYS}; got {ns} and { {k: g[k] for k in _NS_KEYS} }")
        self.ns = ns
        local: list[MatrixHolding] = []
        error = None
        try:
            for slot, (_, _, _, layout, _) in enumerate(self._slots()):
                local.extend(holdings(layout, self.rank, slot))
        except ValueError as err:
            error = f"rank {self.rank}: {err}"
        mine = (local, error, repr(tuple(ns.values())))
        gathered = [mine]
        if self.distributed and self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine, group=self.group)
        errors = [e for _, e, _ in gathered if e]
        if errors:
            raise PlanError("; ".join(errors))
        if len({cfg for _, _, cfg in gathered}) > 1:
            raise PlanError(f"ranks disagree on Newton-Schulz settings {_NS_KEYS}: {[c for _, _, c in gathered]}")
        plan = make_plan(
            [h for hs, _, _ in gathered for h in hs], self.world_size, ns_steps=ns["ns_steps"], owners=self.plan_owners
        )
        logger.debug("%s", plan.summary())
        return plan, MuonExchange(plan, self.rank, self.group if self.distributed else None, max_batch=self.max_batch,
                                  pipeline=self.pipeline_exchange)

    # -- the step -------------------------------------------------------------------------------

    def _any_rank(self, flag: bool) -> bool:
        if self.distributed and self.world_size > 1:
            return any_rank(flag, self.group)
        return flag

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed and self.world_size > 1:
            values = values.to(collective_device(self.group))
            dist.all_reduce(values, group=self.group)
            values = values.cpu()
        return values

    def _missing_gradient(self, group_index: int, index: int) -> None:
        if self.param_groups[group_index]["use_muon"]:
            raise ValueError(
                f"DistributedMuon: {self.label(group_index, index)} of Muon group {group_index} has no gradient; "
                "every rank's pieces need one (a zero gradient is fine)"
            )

    def _muon_step(self, groups: list[tuple[int, dict]], sums: dict[int, list]) -> None:
        slots = list(self._slots())
        inputs = self._momentum_inputs(slots)
        if self.ns_device is not None:  # in the NS dtype, as the exchange would cast them: half the traffic in bf16
            inputs = [x.to(device=self.ns_device, dtype=self.ns["ns_dtype"]) for x in inputs]
        pieces = [p.view(-1).narrow(0, offset, layout.numel) for _, _, p, layout, offset in slots]

        def deliver(items: Sequence[tuple[int, MatrixHolding, Sequence[torch.Tensor]]]) -> None:
            # W -= lr * scale * O, region by region straight from the Newton-Schulz output, every
            # region of the batch in one apply_orthogonal_ (multi-tensor calls per step size)
            targets, updates, steps = [], [], []
            for slot, holding, regions in items:
                gi, group = slots[slot][:2]
                step = group["lr"] * update_scale(group["update_scale"], *holding.shape)
                for r, region in zip(holding.rects, regions):
                    targets.append(rect_view(pieces[slot], r))
                    # with ns_device the result comes back to the tensors' device (offload: the CPU)
                    updates.append(region if region.device == pieces[slot].device else region.to(pieces[slot].device))
                    steps.append(step)
                    self._report(sums, gi, region, step)
            apply_orthogonal_(targets, updates, steps)

        # Decoupled weight decay first (the Newton-Schulz inputs are momenta, not weights); each
        # holding's region then gets its step as it arrives.
        by_decay: dict[tuple, list] = {}
        for (_, group, _, _, _), piece in zip(slots, pieces):
            by_decay.setdefault((group["lr"], group["weight_decay"]), []).append(piece)
        for (lr, wd), tensors in by_decay.items():
            decay_(tensors, lr=lr, weight_decay=wd)
        self.exchange.run(
            inputs, deliver, steps=self.ns["ns_steps"], coefficients=self.ns["ns_coefficients"], dtype=self.ns["ns_dtype"],
            orthogonalize=self.orthogonalize,
        )

    def _momentum_inputs(self, slots: list) -> list[torch.Tensor]:
        """Advance every slot's momentum piece and return the Newton-Schulz inputs, in slot order
        (:func:`muon_megatron.core.update.momentum_`, one call per (momentum, nesterov) pair)."""
        inputs: list[Optional[torch.Tensor]] = [None] * len(slots)
        by_hyper: dict[tuple, list] = {}
        for k, (_, group, p, layout, offset) in enumerate(slots):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            buf = state["momentum_buffer"].view(-1).narrow(0, offset, layout.numel)
            grad = p.grad.reshape(-1).narrow(0, offset, layout.numel)
            by_hyper.setdefault((group["momentum"], group["nesterov"]), []).append((k, buf, grad))
        for (mu, nesterov), items in by_hyper.items():
            ks, bufs, grads = zip(*items)
            for k, out in zip(ks, momentum_(bufs, grads, momentum=mu, nesterov=nesterov)):
                inputs[k] = out
        return inputs  # type: ignore[return-value]

    # -- checkpoints ----------------------------------------------------------------------------
    # Where the pieces lie is a property of this run, not of the checkpoint: a state_dict carries
    # no layouts (RUN_KEYS), and loading keeps the current ones, so a run that resumes with another
    # layout keeps planning with its own. Momentum is per local tensor: for another layout, save
    # :meth:`momentum_pieces` and load them with :meth:`load_momentum_pieces`.

    def momentum_pieces(self) -> list[dict]:
        """This rank's momentum as layout-independent pieces: per local piece its parameter key,
        the full view shape, and each rectangle of the full view with its values. Load them, from
        all ranks of a run with any other layout, with :meth:`load_momentum_pieces`."""
        out = []
        for _, _, p, layout, offset in self._slots():
            buf = self.state[p].get("momentum_buffer")
            flat = buf.view(-1).narrow(0, offset, layout.numel) if buf is not None else None
            for (row, col, rows, cols), start in view_rects(layout):
                values = None
                if flat is not None:
                    values = rect_view(flat, PieceRect(row, col, rows, cols, start, layout.shard_rect[3])).clone()
                out.append({"key": layout.key, "view": layout.view_shape, "rect": (row, col, rows, cols), "values": values})
        return out

    def load_momentum_pieces(self, pieces: Sequence[dict]) -> None:
        """Fill this rank's momentum from pieces saved by :meth:`momentum_pieces` on any layout.
        Every element of every local piece must be covered; else ValueError naming the parameter."""
        by_key: dict[str, list[dict]] = {}
        for piece in pieces:
            by_key.setdefault(piece["key"], []).append(piece)
        for _, _, p, layout, offset in self._slots():
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            flat = state["momentum_buffer"].view(-1).narrow(0, offset, layout.numel)
            stride = layout.shard_rect[3]
            covered = 0
            for (row, col, rows, cols), start in view_rects(layout):
                target = rect_view(flat, PieceRect(row, col, rows, cols, start, stride))
                for saved in by_key.get(layout.key, []):
                    if saved["values"] is None:
                        continue
                    if tuple(saved["view"]) != tuple(layout.view_shape):
                        raise ValueError(f"momentum of {layout.key!r} saved for view {saved['view']}, now {layout.view_shape}")
                    sr, sc, sh, sw = saved["rect"]
                    r0, c0 = max(row, sr), max(col, sc)
                    r1, c1 = min(row + rows, sr + sh), min(col + cols, sc + sw)
                    if r1 > r0 and c1 > c0:
                        target[r0 - row : r1 - row, c0 - col : c1 - col] = saved["values"][r0 - sr : r1 - sr, c0 - sc : c1 - sc]
                        covered += (r1 - r0) * (c1 - c0)
            if covered != layout.numel:
                raise ValueError(
                    f"momentum checkpoint covers {covered} of {layout.numel} elements of {layout.key!r} on this "
                    "rank; pass the pieces saved by every rank of the earlier run"
                )
