"""``MuonBase``: what every Muon optimizer of the package shares.

One ``torch.optim.Optimizer`` base owns the hyper-parameters (defaults and validation, from
:mod:`.hyperparams`), the non-finite gradient check, the AdamW groups, the update-RMS report and
which param-group keys a checkpoint carries. A subclass only says where the pieces of each matrix
are and how they reach Newton-Schulz, in :meth:`MuonBase._muon_step`: :class:`.optimizer.Muon`
holds whole parameters in one process; ``muon_megatron.distributed.DistributedMuon`` holds pieces
spread over ranks, and overrides :meth:`MuonBase._any_rank` / :meth:`MuonBase._sum_over_ranks` with
collectives. Both apply the update of :mod:`.update`.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch

from .adamw import adamw_group_step_
from .hyperparams import MuonHyperparams, check_hyperparameters, dtype_name, resolve_dtype
from .newton_schulz import CoefficientSpec
from .splits import SplitSpec, split_from_dict, split_to_dict

logger = logging.getLogger(__name__)

_DEFAULTS = MuonHyperparams()
NONFINITE_POLICIES = ("skip", "raise")


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step`` with ``nonfinite="raise"`` when a gradient holds inf or NaN."""


def finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Per tensor, whether every element is finite (an empty tensor is).

    The max-abs norm of each, one multi-tensor call per (device, dtype) and one transfer, instead
    of two kernels and a sync per tensor; that norm is finite exactly when every element is (no
    overflow, unlike a 2-norm)."""
    flags: list[bool] = [True] * len(tensors)
    by_kind: dict[tuple, list[int]] = {}
    for k, t in enumerate(tensors):
        if t.numel():
            by_kind.setdefault((t.device, t.dtype), []).append(k)
    for ks in by_kind.values():
        norms = torch._foreach_norm([tensors[k] for k in ks], ord=float("inf"))
        for k, finite in zip(ks, torch.stack(norms).isfinite().tolist()):
            flags[k] = finite
    return flags


def checkpoint_group(group: dict, drop: Iterable[str] = ()) -> dict:
    """A param group as a checkpoint keeps it: every entry but ``params`` and ``drop``, with a
    split spec stored as plain data and the Newton-Schulz dtype by name, so the checkpoint loads
    with ``torch.load(weights_only=True)``."""
    drop = set(drop) | {"params"}
    out = {k: v for k, v in group.items() if k not in drop}
    if isinstance(out.get("split"), SplitSpec):
        out["split"] = split_to_dict(out["split"])
    if isinstance(out.get("ns_dtype"), torch.dtype):
        out["ns_dtype"] = dtype_name(out["ns_dtype"])
    return out


def restore_group(saved: dict) -> dict:
    """Inverse of :func:`checkpoint_group` for the entries it encoded (split, dtype)."""
    group = dict(saved)
    if isinstance(group.get("split"), dict):
        group["split"] = split_from_dict(group["split"])
    if isinstance(group.get("ns_dtype"), str):
        group["ns_dtype"] = resolve_dtype(group["ns_dtype"])
    return group


class MuonBase(torch.optim.Optimizer):
    """Moonlight's Muon for ``use_muon`` param groups, AdamW for the others.

    Args:
        params: tensors or param groups. Groups may set ``use_muon`` (default True), ``names``
            (one per tensor, for messages) and any hyper-parameter below; subclasses read more
            keys (``split``, ``layouts``).
        lr, momentum, nesterov, weight_decay, ns_steps, ns_coefficients, ns_dtype, update_scale,
            adamw_betas, adamw_eps: :class:`~muon_megatron.core.hyperparams.MuonHyperparams`
            (Moonlight's values by default).
        nonfinite: "skip" (a step with any inf/NaN gradient changes nothing and warns, naming the
            tensor) or "raise" (:class:`NonFiniteGradientError`).
        report_update_rms: after each step, fill ``last_update_rms`` (group index -> RMS of the
            applied update, weight decay excluded) and log it at INFO.
        orthogonalize: the Newton-Schulz backend for a list of same-shape matrices, with
            :func:`muon_megatron.core.update.orthogonalize_batched`'s signature (the default).
        max_batch: at most this many matrices per Newton-Schulz call (bounds transient memory).
    """

    #: Group keys that describe this run's tensors, not hyper-parameters: a checkpoint leaves them
    #: out and a load keeps the current run's.
    RUN_KEYS: tuple[str, ...] = ("names",)
    #: Group keys a checkpoint carries but a load does not take over (the current run's stay).
    KEPT_KEYS: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable,
        lr: float = _DEFAULTS.lr,
        momentum: float = _DEFAULTS.momentum,
        nesterov: bool = _DEFAULTS.nesterov,
        weight_decay: float = _DEFAULTS.weight_decay,
        ns_steps: int = _DEFAULTS.ns_steps,
        ns_coefficients: CoefficientSpec = _DEFAULTS.ns_coefficients,
        ns_dtype: torch.dtype = _DEFAULTS.ns_dtype,
        update_scale: str = _DEFAULTS.update_scale,
        adamw_betas: tuple[float, float] = _DEFAULTS.adamw_betas,
        adamw_eps: float = _DEFAULTS.adamw_eps,
        *,
        nonfinite: str = "skip",
        report_update_rms: bool = False,
        orthogonalize: Optional[Callable[..., list]] = None,
        max_batch: int = 128,
    ):
        hyper = MuonHyperparams(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
            ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, update_scale=update_scale, adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
        )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r}: one of {NONFINITE_POLICIES}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.nonfinite = nonfinite
        self.report_update_rms = report_update_rms
        self.orthogonalize = orthogonalize
        self.max_batch = max_batch
        self.last_update_rms: dict[int, float] = {}
        self.skipped_steps = 0
        super().__init__(params, dict(hyper.as_dict(), use_muon=True))

    # -- param groups ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.update(check_hyperparameters(group))
        names = group.setdefault("names", [None] * len(group["params"]))
        if len(names) != len(group["params"]):
            raise ValueError("param group 'names' must list one name per parameter")
        self._check_group(group, len(self.param_groups) - 1)

    def _check_group(self, group: dict, index: int) -> None:
        """Validate the keys a subclass reads from a new group (ValueError naming the fix)."""

    def label(self, group_index: int, index: int) -> str:
        """How messages name tensor ``index`` of param group ``group_index``."""
        name = self.param_groups[group_index]["names"][index]
        return repr(name) if name else f"tensor {index} of param group {group_index}"

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._gradients_finite():
            return loss
        sums: dict[int, list] = {}
        muon = [(i, g) for i, g in enumerate(self.param_groups) if g["use_muon"]]
        if muon:
            self._muon_step(muon, sums)
        for index, group in enumerate(self.param_groups):
            if not group["use_muon"]:
                self._add_rms(sums, index, *adamw_group_step_(group, self.state, report_rms=self.report_update_rms))
        if self.report_update_rms:
            self.last_update_rms = self._rms(sums)
            logger.info("update RMS per group: %s", {k: f"{v:.3e}" for k, v in self.last_update_rms.items()})
        return loss

    def _muon_step(self, groups: list[tuple[int, dict]], sums: dict[int, list]) -> None:
        """Apply the Muon update to the ``(index, group)`` pairs of ``use_muon`` groups; report
        applied updates with :meth:`_report`. Called only when every gradient is finite."""
        raise NotImplementedError

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank of the optimizer's process group (here: one)."""
        return flag

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the optimizer's process group (here: one process)."""
        return values

    def _missing_gradient(self, group_index: int, index: int) -> None:
        """Called for a tensor whose ``.grad`` is None (the step leaves it unchanged here)."""

    def _gradients_finite(self) -> bool:
        """True when every gradient (on every rank) is finite; else skip or raise, naming the
        tensors of this rank that hold inf/NaN."""
        grads, where = [], []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    self._missing_gradient(gi, i)
                    continue
                grads.append(p.grad)
                where.append((gi, i))
        flags = finite_flags(grads)
        if not self._any_rank(not all(flags)):
            return True
        bad = [self.label(gi, i) for (gi, i), ok in zip(where, flags) if not ok]
        message = f"{type(self).__name__}: non-finite gradient in {', '.join(bad) or 'a tensor of another rank'}"
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(message)
        self.skipped_steps += 1
        warnings.warn(f"{message}; step skipped for every group, optimizer state untouched", RuntimeWarning)
        return False

    # -- update RMS -----------------------------------------------------------------------------

    @staticmethod
    def _add_rms(sums: dict[int, list], group_index: int, sq: float, count: int) -> None:
        acc = sums.setdefault(group_index, [0.0, 0])
        acc[0] += sq
        acc[1] += count

    def _report(self, sums: dict[int, list], group_index: int, update: torch.Tensor, step: float) -> None:
        """Count an applied Muon update region (``step * update``) into the RMS report."""
        if self.report_update_rms:
            self._add_rms(sums, group_index, float(update.float().square().sum()) * step**2, update.numel())

    def _rms(self, sums: dict[int, list]) -> dict[int, float]:
        n = len(self.param_groups)
        t = torch.zeros(2 * n, dtype=torch.float64)
        for gi, (sq, count) in sums.items():
            t[2 * gi], t[2 * gi + 1] = sq, count
        t = self._sum_over_ranks(t)
        return {gi: math.sqrt(t[2 * gi] / t[2 * gi + 1]) for gi in range(n) if t[2 * gi + 1] > 0}

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``, without the :attr:`RUN_KEYS` of the groups and
        with split specs and dtypes as plain data (loads with ``torch.load(weights_only=True)``)."""
        state = super().state_dict()
        state["param_groups"] = [
            dict(checkpoint_group(g, self.RUN_KEYS), params=g["params"]) for g in state["param_groups"]
        ]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's (the saved hyper-parameters replace the current ones), keeping this run's
        :attr:`RUN_KEYS` and :attr:`KEPT_KEYS`. ValueError when the saved groups are not of the
        same kinds (``use_muon``) in the same order."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            bool(s.get("use_muon", True)) != bool(g["use_muon"]) for s, g in zip(saved, self.param_groups)
        ):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the checkpoint's {len(saved)} param groups are not this "
                f"optimizer's {len(self.param_groups)} (Muon and AdamW groups in the same order)"
            )
        keep = [{k: g[k] for k in (*self.RUN_KEYS, *self.KEPT_KEYS) if k in g} for g in self.param_groups]
        super().load_state_dict(dict(state_dict, param_groups=[restore_group(g) for g in saved]))
        for group, own in zip(self.param_groups, keep):
            group.update(own)
