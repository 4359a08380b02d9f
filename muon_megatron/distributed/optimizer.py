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
import math
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.newton_schulz import CoefficientSpec
from ..core.optimizer import NonFiniteGradientError, adamw_group_step_, finite_flags, validate_hyperparameters
from ..core.update import update_scale
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


class DistributedMuon(torch.optim.Optimizer):
    """Muon over a process group; AdamW (plain, local) for ``use_muon=False`` groups.

    Args are those of :class:`muon_megatron.Muon` plus ``process_group`` (None: the default
    group when torch.distributed is initialised, else a single process) and ``plan_owners``
    (:func:`make_plan`'s ``owners``: "holders" or "any"); ``orthogonalize`` and ``max_batch`` as
    for :class:`muon_megatron.Muon` (the Newton-Schulz backend, batch bound). Muon groups need
    ``layouts``; every rank of ``process_group`` must construct the optimizer (it is collective).
    Newton-Schulz settings (steps, coefficients, dtype) must be the same for all Muon groups.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 4.2e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_coefficients: CoefficientSpec = "moonlight",
        ns_dtype: torch.dtype = torch.bfloat16,
        update_scale: str = "moonlight",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        plan_owners: str = "holders",
        nonfinite: str = "skip",
        report_update_rms: bool = False,
        orthogonalize: Optional[Callable[..., list]] = None,
        max_batch: int = 128,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
            ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, update_scale=update_scale,
            adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, use_muon=True,
        )
        validate_hyperparameters(dict(defaults, nonfinite=nonfinite))
        self.nonfinite = nonfinite
        self.report_update_rms = report_update_rms
        self.last_update_rms: dict[int, float] = {}
        self.skipped_steps = 0
        self.group = process_group
        self.plan_owners = plan_owners
        self.orthogonalize = orthogonalize
        self.max_batch = max_batch
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        self.world_size = dist.get_world_size(process_group) if self.distributed else 1
        super().__init__(params, defaults)
        self.plan, self.exchange = self._build_plan()

    # -- construction ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_hyperparameters(group)
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
            _normalise_layouts(entry, p, f"param group {len(self.param_groups) - 1}, tensor {i}")
            for i, (entry, p) in enumerate(zip(group["layouts"], group["params"]))
        ]
        for p in group["params"]:
            if not p.is_contiguous():
                raise ValueError("DistributedMuon needs contiguous tensors (pieces are flat ranges of them)")

    def _slots(self):
        """(group, tensor, layout, offset) for every local piece, in slot order."""
        for group in self.param_groups:
            if group["use_muon"]:
                for p, pieces in zip(group["params"], group["layouts"]):
                    for layout, offset in pieces:
                        yield group, p, layout, offset

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
            for slot, (_, _, layout, _) in enumerate(self._slots()):
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
        return plan, MuonExchange(plan, self.rank, self.group if self.distributed else None)

    # -- the step -------------------------------------------------------------------------------

    def _all_finite(self) -> bool:
        """True when every gradient on every rank is finite (one small all-reduce)."""
        grads, where = [], []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None and group["use_muon"]:
                    raise ValueError(
                        f"DistributedMuon: tensor {i} of Muon group {gi} has no gradient; every rank's "
                        "pieces need one (a zero gradient is fine)"
                    )
                if p.grad is not None:
                    grads.append(p.grad)
                    name = group.get("names", [None] * (i + 1))[i]
                    where.append(f"tensor {i} of group {gi}" + (f" ({name})" if name else ""))
        local = finite_flags(grads)
        ok = all(local)
        if self.distributed and self.world_size > 1:
            ok = not any_rank(not ok, self.group)
        if ok:
            return True
        bad = [w for w, f in zip(where, local) if not f]
        message = f"non-finite gradient on rank {self.rank}: {', '.join(bad) or '(on another rank)'}"
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(message)
        self.skipped_steps += 1
        warnings.warn(f"DistributedMuon: {message}; step skipped on every rank, state untouched", RuntimeWarning)
        return False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._all_finite():
            return loss
        slots = list(self._slots())
        inputs = self._momentum_inputs(slots)
        pieces = [p.view(-1).narrow(0, offset, layout.numel) for _, p, layout, offset in slots]
        sums: dict[int, list] = {}
        index = {id(g): i for i, g in enumerate(self.param_groups)}

        def deliver(slot: int, holding: MatrixHolding, regions: Sequence[torch.Tensor]) -> None:
            # param -= lr * scale * O, region by region straight from the Newton-Schulz output
            group = slots[slot][0]
            alpha = group["lr"] * update_scale(group["update_scale"], *holding.shape)
            for r, src in zip(holding.rects, regions):
                rect_view(pieces[slot], r).add_(src, alpha=-alpha)
                if self.report_update_rms:
                    acc = sums.setdefault(index[id(group)], [0.0, 0])
                    acc[0] += float(src.float().square().sum()) * alpha ** 2
                    acc[1] += r.numel

        # Decoupled weight decay first (the Newton-Schulz inputs are momenta, not weights), one
        # multi-tensor call per (lr, wd); each holding's region then gets its step as it arrives.
        decay: dict[float, list] = {}
        for (group, _, _, _), piece in zip(slots, pieces):
            if group["weight_decay"]:
                decay.setdefault(1.0 - group["lr"] * group["weight_decay"], []).append(piece)
        for factor, tensors in decay.items():
            torch._foreach_mul_(tensors, factor)
        self.exchange.run(
            inputs, deliver, steps=self.ns["ns_steps"], coefficients=self.ns["ns_coefficients"], dtype=self.ns["ns_dtype"],
            orthogonalize=self.orthogonalize, max_batch=self.max_batch,
        )
        for gi, group in enumerate(self.param_groups):
            if not group["use_muon"]:
                sq, count = adamw_group_step_(group, self.state, report_rms=self.report_update_rms)
                acc = sums.setdefault(gi, [0.0, 0])
                acc[0] += sq
                acc[1] += count
        if self.report_update_rms:
            self.last_update_rms = self._reduce_rms(sums)
            logger.info("update RMS per group: %s", {k: f"{v:.3e}" for k, v in self.last_update_rms.items()})
        return loss

    def _momentum_inputs(self, slots: list) -> list[torch.Tensor]:
        """Advance every slot's momentum piece and return the Newton-Schulz inputs, in slot order:
        :func:`muon_megatron.core.update.momentum_` element for element, as multi-tensor calls
        (one set per (momentum, nesterov) pair) instead of three kernels per piece."""
        inputs: list[Optional[torch.Tensor]] = [None] * len(slots)
        by_hyper: dict[tuple, list] = {}
        for k, (group, p, layout, offset) in enumerate(slots):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            buf = state["momentum_buffer"].view(-1).narrow(0, offset, layout.numel)
            grad = p.grad.reshape(-1).narrow(0, offset, layout.numel)
            by_hyper.setdefault((group["momentum"], group["nesterov"]), []).append((k, buf, grad))
        for (mu, nesterov), items in by_hyper.items():
            ks, bufs, grads = zip(*items)
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            outs = torch._foreach_add(grads, bufs, alpha=mu) if nesterov else bufs
            for k, out in zip(ks, outs):
                inputs[k] = out
        return inputs  # type: ignore[return-value]

    def _reduce_rms(self, sums: dict[int, list]) -> dict[int, float]:
        n = len(self.param_groups)
        t = torch.zeros(2 * n, dtype=torch.float64)
        for gi, (sq, count) in sums.items():
            t[2 * gi], t[2 * gi + 1] = sq, count
        if self.distributed and self.world_size > 1:
            t = t.to(collective_device(self.group))
            dist.all_reduce(t, group=self.group)
            t = t.cpu()
        return {gi: math.sqrt(t[2 * gi] / t[2 * gi + 1]) for gi in range(n) if t[2 * gi + 1] > 0}

    # -- checkpoints ----------------------------------------------------------------------------

    # Where the pieces lie is a property of this run, not of the checkpoint: a state_dict carries
    # no layouts (it then loads with weights_only=True), and loading keeps the current ones, so a
    # run that resumes with another layout keeps planning with its own.
    _LAYOUT_KEYS = ("layouts", "names")

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict`` without the groups' ``layouts`` and ``names``."""
        state = super().state_dict()
        state["param_groups"] = [{k: v for k, v in g.items() if k not in self._LAYOUT_KEYS} for g in state["param_groups"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's (saved hyper-parameters replace the current ones), keeping this run's
        ``layouts`` and ``names``. Momentum is per local tensor: for another layout use
        :meth:`load_momentum_pieces`."""
        keep = [{k: g[k] for k in self._LAYOUT_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, own in zip(self.param_groups, keep):
            group.update(own)

    def momentum_pieces(self) -> list[dict]:
        """This rank's momentum as layout-independent pieces: per local piece its parameter key,
        the full view shape, and each rectangle of the full view with its values. Load them, from
        all ranks of a run with any other layout, with :meth:`load_momentum_pieces`."""
        out = []
        for group, p, layout, offset in self._slots():
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
        for group, p, layout, offset in self._slots():
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
