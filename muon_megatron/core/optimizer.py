"""``Muon``: Moonlight's optimizer for one process, as a ``torch.optim.Optimizer``.

Param groups carry ``use_muon``: True groups get the Muon update of :mod:`.update` on every
logical matrix of their ``split`` (default: :func:`.splits.default_split`), False groups get
AdamW with the group's lr and weight decay (bitwise what ``torch.optim.AdamW`` computes on the
CPU). :func:`.routing.muon_param_groups` builds the groups the Moonlight way.

This is the reference every distributed path is tested against.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch

from .newton_schulz import CoefficientSpec, resolve_coefficients
from .splits import (
    LogicalMatrix,
    SplitSpec,
    check_tiling,
    default_split,
    gather_matrix,
    split_from_dict,
    split_to_dict,
)
from .update import (
    check_update_scale,
    momentum_,
    orthogonalize_batched,
    update_scale,
)

logger = logging.getLogger(__name__)


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

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step`` with ``nonfinite="raise"`` when a gradient holds inf or NaN."""


def resolve_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or its name ("bfloat16", "float32", ...); ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"unknown ns_dtype {dtype!r}; valid names: {sorted(_DTYPES)}")


def validate_hyperparameters(group: dict) -> None:
    """Check one param group's hyper-parameters; ValueError naming the bad one and its range."""
    checks = {
        "lr": lambda v: v >= 0,
        "weight_decay": lambda v: v >= 0,
        "momentum": lambda v: 0 <= v < 1,
        "adamw_eps": lambda v: v > 0,
    }
    for key, ok in checks.items():
        if key in group and not ok(float(group[key])):
            raise ValueError(f"invalid {key}={group[key]!r} (lr, weight_decay >= 0; 0 <= momentum < 1; adamw_eps > 0)")
    betas = group.get("adamw_betas", (0.9, 0.95))
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"invalid adamw_betas={betas!r}: two values in [0, 1)")
    resolve_coefficients(group.get("ns_coefficients", "moonlight"), group.get("ns_steps", 5))
    check_update_scale(group.get("update_scale", "moonlight"))
    group["ns_dtype"] = resolve_dtype(group.get("ns_dtype", torch.bfloat16))
    if group.get("nonfinite", "skip") not in ("skip", "raise"):
        raise ValueError(f"invalid nonfinite={group['nonfinite']!r}: 'skip' or 'raise'")


def adamw_step_(
    param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas: Sequence[float], eps: float,
    weight_decay: float,
) -> torch.Tensor:
    """One AdamW step on ``param`` in place, in the operation order of ``torch.optim.AdamW``'s
    single-tensor path (so the result is bitwise equal on the CPU). ``state`` holds ``step``,
    ``exp_avg`` and ``exp_avg_sq`` and is created on first use. Returns the applied update
    (excluding weight decay) only when asked by the caller via ``state``-free recomputation; here
    the return value is ``step_size * exp_avg / denom`` for RMS reporting."""
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    beta1, beta2 = betas
    state["step"] += 1
    step = state["step"].item()
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    return exp_avg, denom, step_size


def adamw_group_step_(group: dict, state: dict, *, report_rms: bool) -> tuple[float, int]:
    """AdamW on every parameter of ``group`` that has a gradient (``state``: the optimizer's
    per-parameter state). Returns the sum of squares of the applied updates (weight decay
    excluded) and their element count, for RMS reporting (0, 0 unless ``report_rms``)."""
    sq, count = 0.0, 0
    for p in group["params"]:
        if p.grad is None:
            continue
        exp_avg, denom, step_size = adamw_step_(
            p, p.grad, state[p], lr=group["lr"], betas=group["adamw_betas"], eps=group["adamw_eps"],
            weight_decay=group["weight_decay"],
        )
        if report_rms:
            sq += float((exp_avg / denom).square().sum()) * step_size**2
            count += p.numel()
    return sq, count


class Muon(torch.optim.Optimizer):
    """Moonlight's Muon with AdamW for the non-matrix parameters, in one process.

    Args:
        params: tensors or param groups. Groups may set ``use_muon`` (default True), ``split``
            (a :class:`SplitSpec`, Muon groups only), ``names`` (parameter names, for messages)
            and any hyper-parameter below.
        lr: learning rate, shared by Muon and AdamW (Moonlight: the AdamW lr carries over).
        momentum: Muon momentum mu (sum form, ``buf = mu * buf + g``).
        nesterov: use ``g + mu * buf`` as the Newton-Schulz input.
        weight_decay: decoupled, ``W *= 1 - lr * wd``, for both kinds of group.
        ns_steps, ns_coefficients, ns_dtype: Newton-Schulz iterations, coefficient set (name or
            list of (a, b, c)) and compute dtype.
        update_scale: "moonlight" (0.2 * sqrt(max(A, B))), "keller", "spectral" or "none".
        adamw_betas, adamw_eps: AdamW's betas and eps for ``use_muon=False`` groups.
        nonfinite: "skip" (default: a step with any inf/NaN gradient changes nothing and warns
            naming the parameter) or "raise" (:class:`NonFiniteGradientError`).
        report_update_rms: after each step, fill ``last_update_rms`` (group index -> RMS of the
            applied update, weight decay excluded) and log it at INFO.
        orthogonalize: the Newton-Schulz backend for a list of same-shape matrices, with
            :func:`.update.orthogonalize_batched`'s signature (the default); e.g.
            ``functools.partial(muon_megatron.kernels.orthogonalize_grouped, backend=...)``.
        max_batch: at most this many matrices per Newton-Schulz call (bounds transient memory).

    Promise: for each logical matrix, the update of ``../shared/MOONLIGHT.md`` (paper eq. 4); equal
    to a float64 evaluation of the formula within ``ns_dtype`` rounding.
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
        self.orthogonalize = orthogonalize or orthogonalize_batched
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.last_update_rms: dict[int, float] = {}
        self.skipped_steps = 0
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_hyperparameters(group)
        names = group.setdefault("names", [None] * len(group["params"]))
        if len(names) != len(group["params"]):
            raise ValueError("param group 'names' must list one name per parameter")
        if group["use_muon"]:
            split = group.get("split")
            for name, p in zip(names, group["params"]):
                self._matrices(group, p, name)  # validates now, not at the first step
            if split is not None and not isinstance(split, SplitSpec):
                raise ValueError(f"param group 'split' must be a SplitSpec, got {split!r}")
        elif group.get("split") is not None:
            raise ValueError("a use_muon=False (AdamW) group cannot carry a 'split'")

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``, with each group's ``split`` stored as plain data
        (:func:`.splits.split_to_dict`) so the result loads with ``torch.load(weights_only=True)``."""
        state = super().state_dict()
        for group in state["param_groups"]:
            if isinstance(group.get("split"), SplitSpec):
                group["split"] = split_to_dict(group["split"])
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of :meth:`state_dict`; also accepts splits stored as :class:`SplitSpec` objects.
        Like torch's, the saved hyper-parameters (and split) replace the current groups' values."""
        state_dict = dict(state_dict)
        groups = []
        for group in state_dict["param_groups"]:
            group = dict(group)
            if isinstance(group.get("split"), dict):
                group["split"] = split_from_dict(group["split"])
            groups.append(group)
        state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)

    @staticmethod
    def _label(group: dict, index: int) -> str:
        name = group["names"][index]
        return repr(name) if name else f"parameter {index} of a param group"

    def _matrices(self, group: dict, p: torch.Tensor, name: Optional[str]) -> tuple[LogicalMatrix, ...]:
        label = repr(name) if name else f"a parameter of shape {tuple(p.shape)}"
        try:
            split = group.get("split") or default_split(p.shape)
            view = split.view_shape(p.shape)
            matrices = split.matrices(p.shape)
            check_tiling(matrices, view, label)
        except ValueError as err:
            raise ValueError(
                f"Muon cannot orthogonalise {label} (shape {tuple(p.shape)}): {err}. Route it to AdamW "
                "(a param group with use_muon=False, or the adamw=[...] name patterns of "
                "muon_param_groups) or give it a split spec whose logical matrices are 2-D."
            ) from None
        return matrices

    def _check_finite(self) -> bool:
        grads, where = [], []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    grads.append(p.grad)
                    where.append((group, i))
        flags = finite_flags(grads)
        if all(flags):
            return True
        bad = [self._label(g, i) for (g, i), ok in zip(where, flags) if not ok]
        message = f"non-finite gradient in {', '.join(bad)}"
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(message)
        self.skipped_steps += 1
        warnings.warn(f"Muon: {message}; step skipped for every group, optimizer state untouched", RuntimeWarning)
        return False

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._check_finite():
            return loss
        self.last_update_rms = {}
        for index, group in enumerate(self.param_groups):
            sq, count = (self._muon_group(group) if group["use_muon"] else self._adamw_group(group))
            if self.report_update_rms and count:
                self.last_update_rms[index] = math.sqrt(sq / count)
        if self.report_update_rms:
            logger.info("update RMS per group: %s", {k: f"{v:.3e}" for k, v in self.last_update_rms.items()})
        return loss

    def _adamw_group(self, group: dict) -> tuple[float, int]:
        return adamw_group_step_(group, self.state, report_rms=self.report_update_rms)

    def _muon_group(self, group: dict) -> tuple[float, int]:
        # Nesterov inputs for every parameter, then Newton-Schulz one bucket (same shape, at most
        # ``max_batch`` matrices) at a time, so the transient memory is one bucket, not the model.
        lr, wd = group["lr"], group["weight_decay"]
        inputs, by_shape = {}, {}
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            U = momentum_(state["momentum_buffer"], p.grad, group["momentum"], group["nesterov"])
            view_shape = (group.get("split") or default_split(p.shape)).view_shape(p.shape)
            inputs[id(p)] = U.reshape(view_shape)
            for mat in self._matrices(group, p, group["names"][i]):
                by_shape.setdefault(mat.shape, []).append((p, mat))
            if wd:  # decoupled weight decay first, as in W * (1 - lr * wd) - lr * scale * O
                p.mul_(1.0 - lr * wd)
        sq, count = 0.0, 0
        for shape, places in by_shape.items():
            scale = update_scale(group["update_scale"], *shape)
            for start in range(0, len(places), self.max_batch):
                chunk = places[start : start + self.max_batch]
                outputs = self.orthogonalize(
                    [gather_matrix(inputs[id(p)], mat) for p, mat in chunk],
                    steps=group["ns_steps"], coefficients=group["ns_coefficients"], dtype=group["ns_dtype"],
                )
                for (p, mat), O in zip(chunk, outputs):
                    # W -= (lr * scale) * O, block by block: one kernel, the NS output read once
                    # (DistributedMuon applies the same expression, so both agree bit for bit)
                    view = p.view(inputs[id(p)].shape)
                    for b in mat.blocks:
                        view[b.src_row : b.src_row + b.rows, b.src_col : b.src_col + b.cols].add_(
                            O[b.dst_row : b.dst_row + b.rows, b.dst_col : b.dst_col + b.cols], alpha=-lr * scale,
                        )
                    if self.report_update_rms:
                        sq += float(O.float().square().sum()) * (lr * scale) ** 2
                    count += O.numel()
        return sq, count
