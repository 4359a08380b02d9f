"""The ``"optimizer": {"type": "muon", "params": {...}}`` section, read into a typed config.

DeepSpeed's own naming style is kept (lowercase keys, ``lr``, ``weight_decay``); the keys that
DeepSpeed's built-in Muon spells differently (``betas``, ``eps``, ``muon_lr``, ``adam_lr``,
``ns_method``) are refused with the key to use instead, never silently mapped. Defaults are
Moonlight's (``../shared/MOONLIGHT.md``).

:func:`split_config` separates a DeepSpeed config into what DeepSpeed itself should see and the
:class:`MuonConfig` this package acts on, and refuses the settings the adapter does not support
(ZeRO-3, optimizer or parameter offload) at initialize, before any engine exists.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Optional

from ..core.newton_schulz import resolve_coefficients
from ..core.optimizer import resolve_dtype
from ..core.update import check_update_scale
from ..kernels.orthogonalize import check_backend_name

#: ``optimizer.params.implementation`` values: ours, or DeepSpeed's built-in MuonWithAuxAdam.
IMPLEMENTATIONS = ("muon_megatron", "deepspeed")

#: Keys of DeepSpeed's built-in Muon that mean something else here: key -> what to write instead.
_FOREIGN_KEYS = {
    "betas": "adamw_betas",
    "eps": "adamw_eps",
    "muon_lr": "lr (Moonlight shares one lr between Muon and AdamW)",
    "adam_lr": "lr (Moonlight shares one lr between Muon and AdamW)",
    "ns_method": "ns_coefficients / ns_steps / ns_dtype",
    "per_head_muon": "nothing: Moonlight orthogonalises whole matrices (use splits= for fused QKV)",
    "adam_w_mode": "nothing: the non-Muon parameters always get decoupled AdamW",
    "torch_adam": "nothing: the non-Muon parameters always get decoupled AdamW",
}


@dataclass(frozen=True, kw_only=True)
class MuonConfig:
    """Moonlight Muon settings for DeepSpeed, one field per ``optimizer.params`` key."""

    lr: float = 4.2e-4
    """Learning rate shared by Muon and AdamW (Moonlight: the AdamW lr carries over)."""
    momentum: float = 0.95
    """Muon momentum mu, sum form ``buf = mu * buf + g``."""
    nesterov: bool = True
    """Newton-Schulz input ``g + mu * buf`` (True) or ``buf`` (False)."""
    weight_decay: float = 0.1
    """Decoupled weight decay ``W *= 1 - lr * wd`` for Muon and AdamW parameters alike."""
    ns_steps: int = 5
    """Newton-Schulz iterations."""
    ns_coefficients: Any = "moonlight"
    """A name in ``muon_megatron.NS_COEFFICIENTS`` or a list of (a, b, c) triples."""
    ns_dtype: str = "bfloat16"
    """Newton-Schulz compute dtype: "bfloat16" (Moonlight) or "float32" (tests, exactness)."""
    update_scale: str = "moonlight"
    """"moonlight" (0.2 * sqrt(max(A, B))), "keller", "spectral" or "none"."""
    adamw_betas: tuple = (0.9, 0.95)
    """AdamW betas for the non-Muon parameters."""
    adamw_eps: float = 1e-8
    """AdamW eps for the non-Muon parameters."""
    adamw: tuple = ()
    """fnmatch patterns of parameter names forced to AdamW (each must match a parameter)."""
    muon: tuple = ()
    """fnmatch patterns of parameter names forced to Muon (each must match a parameter)."""
    ns_backend: str = "auto"
    """Newton-Schulz implementation: "auto" (on CUDA the fastest of ``muon_megatron.kernels``'
    backends, timed once per bucket shape; elsewhere the batched torch path), "torch" or a name in
    ``muon_megatron.kernels.NS_BACKENDS``."""
    implementation: str = "muon_megatron"
    """"muon_megatron" (this package) or "deepspeed" (keep DeepSpeed's built-in MuonWithAuxAdam)."""

    def __post_init__(self):
        object.__setattr__(self, "adamw_betas", tuple(float(b) for b in self.adamw_betas))
        for key in ("adamw", "muon"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, key, tuple(value))
            if not all(isinstance(p, str) for p in value):
                raise ValueError(f"optimizer.params.{key} must be a list of name patterns, got {value!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"optimizer.params.implementation={self.implementation!r}; valid values: {list(IMPLEMENTATIONS)}"
            )
        for key, ok, rule in (
            ("lr", self.lr >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("adamw_eps", self.adamw_eps > 0, "> 0"),
        ):
            if not ok:
                raise ValueError(f"optimizer.params.{key}={getattr(self, key)!r} must be {rule}")
        if len(self.adamw_betas) != 2 or not all(0 <= b < 1 for b in self.adamw_betas):
            raise ValueError(f"optimizer.params.adamw_betas={self.adamw_betas!r}: two values in [0, 1)")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"optimizer.params.nesterov must be true or false, got {self.nesterov!r}")
        try:
            resolve_coefficients(self.ns_coefficients, self.ns_steps)
            check_update_scale(self.update_scale)
            resolve_dtype(self.ns_dtype)
            check_backend_name(self.ns_backend, "ns_backend")
        except ValueError as err:
            raise ValueError(f"optimizer.params: {err}") from None

    @classmethod
    def from_params(cls, params: Optional[dict]) -> "MuonConfig":
        """Read ``optimizer.params``; ValueError naming any unknown or foreign key."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        for key in params:
            if key in _FOREIGN_KEYS:
                raise ValueError(
                    f"optimizer.params.{key} is a key of DeepSpeed's built-in Muon; with muon_megatron use "
                    f"{_FOREIGN_KEYS[key]} (or set \"implementation\": \"deepspeed\" to keep the built-in)"
                )
            if key not in known:
                raise ValueError(f"unknown optimizer.params.{key}; valid keys: {sorted(known)}")
        return cls(**params)

    def optimizer_kwargs(self) -> dict:
        """Keyword arguments for :class:`muon_megatron.distributed.DistributedMuon` and
        :class:`muon_megatron.Muon` (hand-written: every key is listed)."""
        return dict(
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            ns_steps=self.ns_steps,
            ns_coefficients=self.ns_coefficients,
            ns_dtype=resolve_dtype(self.ns_dtype),
            update_scale=self.update_scale,
            adamw_betas=self.adamw_betas,
            adamw_eps=self.adamw_eps,
        )


def load_config(config) -> dict:
    """A deep copy of a DeepSpeed config given as a dict or a JSON file path."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    return copy.deepcopy(config)


def wants_our_muon(config: dict) -> bool:
    """True when the config asks for ``"type": "muon"`` and does not keep the built-in."""
    section = config.get("optimizer") or {}
    if str(section.get("type", "")).lower() != "muon":
        return False
    impl = (section.get("params") or {}).get("implementation", "muon_megatron")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"optimizer.params.implementation={impl!r}; valid values: {list(IMPLEMENTATIONS)}")
    return impl == "muon_megatron"


def _zero_section(config: dict) -> dict:
    return config.get("zero_optimization") or {}


def zero_stage(config: dict) -> int:
    return int(_zero_section(config).get("stage", 0))


def check_supported(config: dict) -> None:
    """Refuse, with the fix, what the adapter does not implement (never fall back silently)."""
    stage = zero_stage(config)
    if stage not in (0, 1, 2):
        raise ValueError(
            f"muon_megatron's DeepSpeed Muon supports zero_optimization.stage 0, 1 and 2, not {stage}. "
            "Use stage 1 (Moonlight's setting) or 2, or keep DeepSpeed's built-in Muon with "
            "optimizer.params.implementation = \"deepspeed\"."
        )
    zero = _zero_section(config)
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if str(device).lower() not in ("none", ""):
            raise ValueError(
                f"muon_megatron's DeepSpeed Muon does not support zero_optimization.{key} (device {device!r}): "
                "Newton-Schulz needs the momentum of whole matrices on the accelerator. Remove "
                f"zero_optimization.{key}, or use optimizer.params.implementation = \"deepspeed\"."
            )
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            "zero_optimization.elastic_checkpoint is not supported by muon_megatron's DeepSpeed Muon; remove it "
            "(to change the data-parallel size, convert with ds_to_universal instead)"
        )


def split_config(config) -> tuple[dict, Optional[MuonConfig]]:
    """``(config for DeepSpeed, MuonConfig or None)``.

    When the config selects our Muon, the returned DeepSpeed config has no ``optimizer`` section
    (the optimizer is passed to ``deepspeed.initialize`` as a client optimizer, so DeepSpeed
    neither builds nor tags anything for its built-in Muon) and has
    ``zero_allow_untested_optimizer`` set, which ZeRO requires of client optimizers. Otherwise the
    config is returned as given (minus our ``implementation`` key) with None.
    """
    config = load_config(config)
    if not wants_our_muon(config):
        params = (config.get("optimizer") or {}).get("params")
        if isinstance(params, dict):
            params.pop("implementation", None)
        return config, None
    muon = MuonConfig.from_params(config["optimizer"].get("params"))
    check_supported(config)
    ds_config = {k: v for k, v in config.items() if k != "optimizer"}
    if zero_stage(config) > 0:
        ds_config["zero_allow_untested_optimizer"] = True
    return ds_config, muon
