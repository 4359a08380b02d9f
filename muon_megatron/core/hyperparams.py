"""Muon's hyper-parameters, defined and validated once.

:class:`MuonHyperparams` holds Moonlight's defaults (arXiv 2502.16982; ``../shared/MOONLIGHT.md``)
and :func:`check_hyperparameters` is the one validation every front end calls: the optimizers'
keyword arguments and param groups, the Megatron flags (``--muon-momentum`` ...), DeepSpeed's
``optimizer.params`` keys and the GPU step runtime. Each front end passes its own ``spelling`` of
the names, so a message names what the user wrote and says what to write instead.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import torch

from .newton_schulz import CoefficientSpec, resolve_coefficients
from .update import check_update_scale

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or its name ("bfloat16", "float32", ...); ValueError otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"unknown ns_dtype {dtype!r}; valid names: {sorted(_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling configs and checkpoints store)."""
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True, kw_only=True)
class MuonHyperparams:
    """The hyper-parameters of one Muon param group, Moonlight's values by default; validated on
    construction (:func:`check_hyperparameters`)."""

    lr: float = 4.2e-4
    """Learning rate, shared by Muon and AdamW (Moonlight: the AdamW lr carries over)."""
    momentum: float = 0.95
    """Muon momentum mu, sum form ``buf = mu * buf + g``."""
    nesterov: bool = True
    """Newton-Schulz input ``g + mu * buf`` (True) or ``buf`` (False)."""
    weight_decay: float = 0.1
    """Decoupled, ``W *= 1 - lr * wd``, for Muon and AdamW parameters alike."""
    ns_steps: int = 5
    """Newton-Schulz iterations."""
    ns_coefficients: CoefficientSpec = "moonlight"
    """A name in ``NS_COEFFICIENTS`` or a list of (a, b, c) triples."""
    ns_dtype: torch.dtype = torch.bfloat16
    """Newton-Schulz compute dtype (a dtype or its name)."""
    update_scale: str = "moonlight"
    """"moonlight" (0.2 sqrt(max(A, B))), "keller", "spectral" or "none"."""
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's betas for the ``use_muon=False`` groups."""
    adamw_eps: float = 1e-8
    """AdamW's eps for the ``use_muon=False`` groups."""

    def __post_init__(self):
        for key, value in check_hyperparameters(asdict(self)).items():
            object.__setattr__(self, key, value)

    def as_dict(self) -> dict:
        """The fields as a dict (the keyword arguments of the optimizers)."""
        return asdict(self)


#: The hyper-parameter names, in :class:`MuonHyperparams` order.
HYPERPARAMETERS = tuple(MuonHyperparams.__dataclass_fields__)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_hyperparameters(values: Mapping[str, Any], spelling: Optional[Mapping[str, str]] = None) -> dict:
    """Validate the hyper-parameters present in ``values`` (other keys are ignored) and return
    them normalised: ``ns_dtype`` as a torch dtype, ``adamw_betas`` as a tuple of floats.

    ``spelling`` maps a name to what the user wrote for it (``"momentum"`` ->
    ``"--muon-momentum"``); ValueError messages use it, with the valid range or names.
    """
    spelled = lambda key: (spelling or {}).get(key, key)  # noqa: E731
    out: dict = {}

    def fail(key, rule):
        raise ValueError(f"{spelled(key)}={values[key]!r}: {rule}")

    ranges = {
        "lr": (lambda v: v >= 0, "must be a number >= 0"),
        "weight_decay": (lambda v: v >= 0, "must be a number >= 0"),
        "momentum": (lambda v: 0 <= v < 1, "must be a number in [0, 1)"),
        "adamw_eps": (lambda v: v > 0, "must be a number > 0"),
    }
    for key, (ok, rule) in ranges.items():
        if key in values:
            if not _number(values[key]) or not ok(values[key]):
                fail(key, rule)
            out[key] = values[key]
    if "nesterov" in values:
        if not isinstance(values["nesterov"], bool):
            fail("nesterov", "must be true or false")
        out["nesterov"] = values["nesterov"]
    if "adamw_betas" in values:
        betas = values["adamw_betas"]
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2 or not all(
            _number(b) and 0 <= b < 1 for b in betas
        ):
            fail("adamw_betas", "must be two numbers in [0, 1)")
        out["adamw_betas"] = tuple(float(b) for b in betas)
    if "ns_steps" in values:
        steps = values["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            fail("ns_steps", "must be a positive integer")
        out["ns_steps"] = steps
    checks = {
        "ns_coefficients": lambda v: resolve_coefficients(v, values.get("ns_steps", MuonHyperparams.ns_steps)) and v,
        "ns_dtype": resolve_dtype,
        "update_scale": check_update_scale,
    }
    for key, check in checks.items():
        if key in values:
            try:
                out[key] = check(values[key])
            except ValueError as err:
                raise ValueError(f"{spelled(key)}: {err}") from None
    return out
