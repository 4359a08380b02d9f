"""The ``"optimizer": {"type": "muon", "params": {...}}`` section, read into a typed config.

DeepSpeed's own naming style is kept (lowercase keys, ``lr``, ``weight_decay``). ``betas`` and
``eps``, as DeepSpeed's AdamW and Hugging Face's templates write them, are the betas and eps of
the AdamW half (``adamw_betas``, ``adamw_eps``). Keys of DeepSpeed's built-in Muon that mean
something else here (``muon_lr``, ``adam_lr``, ``ns_method`` ...) are refused with the key to use
instead, never silently mapped, and so is a value left at Hugging Face's ``"auto"``. Defaults and
validation are the core's (:class:`muon_megatron.core.hyperparams.MuonHyperparams`).

:func:`split_config` separates a DeepSpeed config into what DeepSpeed itself should see and the
:class:`MuonConfig` this package acts on, and refuses the settings the adapter does not support
(:func:`check_supported`: NVMe or partial offload, MiCS, elastic checkpoints) at initialize,
before any engine exists.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Optional

from ..core.hyperparams import HYPERPARAMETERS, MuonHyperparams, check_hyperparameters, dtype_name, resolve_dtype
from ..core.qk_clip import GQA_RULES
from ..kernels.orthogonalize import check_backend_name

#: ``optimizer.params.implementation`` values: ours, or DeepSpeed's built-in MuonWithAuxAdam.
IMPLEMENTATIONS = ("muon_megatron", "deepspeed")

#: Keys of DeepSpeed's built-in Muon that mean something else here: key -> what to write instead.
_FOREIGN_KEYS = {
    "muon_lr": "lr (Moonlight shares one lr between Muon and AdamW)",
    "adam_lr": "lr (Moonlight shares one lr between Muon and AdamW)",
    "ns_method": "ns_coefficients / ns_steps / ns_dtype",
    "per_head_muon": "nothing: Moonlight orthogonalises whole matrices (use splits= for fused QKV)",
    "adam_w_mode": "nothing: the non-Muon parameters always get decoupled AdamW",
    "torch_adam": "nothing: the non-Muon parameters always get decoupled AdamW",
}

#: Keys Hugging Face's DeepSpeed templates and DeepSpeed's AdamW use for AdamW's betas and eps: here
#: they are the betas and eps of the AdamW half (the Trainer fills ``"auto"`` from
#: ``TrainingArguments.adam_beta1/2`` and ``adam_epsilon``).
_ADAMW_ALIASES = {"betas": "adamw_betas", "eps": "adamw_eps"}

_DEFAULTS = MuonHyperparams()

#: Keys for which "auto" is a value of ours, not Hugging Face's placeholder.
_AUTO_VALUED = ("ns_backend",)


@dataclass(frozen=True, kw_only=True)
class MuonConfig:
    """Moonlight Muon settings for DeepSpeed, one field per ``optimizer.params`` key (defaults and
    validation are :class:`muon_megatron.core.hyperparams.MuonHyperparams`'s)."""

    lr: float = _DEFAULTS.lr
    """Learning rate shared by Muon and AdamW (Moonlight: the AdamW lr carries over)."""
    momentum: float = _DEFAULTS.momentum
    """Muon momentum mu, sum form ``buf = mu * buf + g``."""
    nesterov: bool = _DEFAULTS.nesterov
    """Newton-Schulz input ``g + mu * buf`` (True) or ``buf`` (False)."""
    weight_decay: float = _DEFAULTS.weight_decay
    """Decoupled weight decay ``W *= 1 - lr * wd`` for Muon and AdamW parameters alike."""
    ns_steps: int = _DEFAULTS.ns_steps
    """Newton-Schulz iterations."""
    ns_coefficients: Any = _DEFAULTS.ns_coefficients
    """A name in ``muon_megatron.NS_COEFFICIENTS`` or a list of (a, b, c) triples."""
    ns_dtype: str = dtype_name(_DEFAULTS.ns_dtype)
    """Newton-Schulz compute dtype: "bfloat16" (Moonlight) or "float32" (tests, exactness)."""
    update_scale: str = _DEFAULTS.update_scale
    """"moonlight" (0.2 * sqrt(max(A, B))), "keller", "spectral" or "none"."""
    adamw_betas: tuple = _DEFAULTS.adamw_betas
    """AdamW betas for the non-Muon parameters (also read from ``betas``)."""
    adamw_eps: float = _DEFAULTS.adamw_eps
    """AdamW eps for the non-Muon parameters (also read from ``eps``)."""
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
    qk_clip_threshold: Optional[float] = None
    """QK-Clip (Kimi K2's MuonClip) threshold tau on the per-head max pre-softmax logit (Kimi K2:
    100); None (default, as in Moonlight) turns QK-Clip off. Needs the model's attention layers
    declared (see :mod:`.qk_clip`)."""
    qk_clip_alpha: float = 0.5
    """Share of a clipped head's factor gamma given to the queries (``gamma ** alpha``); the keys
    get ``gamma ** (1 - alpha)`` (megatron-core's ``qk_clip_alpha``)."""
    qk_clip_gqa_rule: str = "per_head"
    """GQA (a key head shared by several query heads): "per_head" (each clipped head lands on the
    threshold) or "group" (megatron-core's rule); see :mod:`muon_megatron.core.qk_clip`."""

    def __post_init__(self):
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
        values = {k: getattr(self, k) for k in HYPERPARAMETERS}
        checked = check_hyperparameters(values, spelling={k: f"optimizer.params.{k}" for k in values})
        object.__setattr__(self, "adamw_betas", checked["adamw_betas"])
        try:
            check_backend_name(self.ns_backend, "ns_backend")
        except ValueError as err:
            raise ValueError(f"optimizer.params: {err}") from None
        self._check_qk_clip()

    def _check_qk_clip(self) -> None:
        tau, alpha = self.qk_clip_threshold, self.qk_clip_alpha
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau)
                                or tau <= 0):
            raise ValueError(f"optimizer.params.qk_clip_threshold={tau!r}: give a finite number > 0 (Kimi K2 uses "
                             "100), or null to turn QK-Clip off")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"optimizer.params.qk_clip_alpha={alpha!r}: give a number in [0, 1] (0.5 scales queries "
                             "and keys by sqrt(gamma) each)")
        if self.qk_clip_gqa_rule not in GQA_RULES:
            raise ValueError(f"optimizer.params.qk_clip_gqa_rule={self.qk_clip_gqa_rule!r}; valid values: "
                             f"{list(GQA_RULES)}")

    @property
    def qk_clip(self) -> bool:
        """Whether QK-Clip is on (``qk_clip_threshold`` set)."""
        return self.qk_clip_threshold is not None

    @classmethod
    def from_params(cls, params: Optional[dict]) -> "MuonConfig":
        """Read ``optimizer.params``; ValueError naming any unknown or foreign key, and any value
        still ``"auto"`` (Hugging Face's placeholder, which its integration fills before DeepSpeed
        sees the config: one that arrives here was not filled)."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        for key, value in params.items():
            if key in _FOREIGN_KEYS:
                raise ValueError(
                    f"optimizer.params.{key} is a key of DeepSpeed's built-in Muon; with muon_megatron use "
                    f"{_FOREIGN_KEYS[key]} (or set \"implementation\": \"deepspeed\" to keep the built-in)"
                )
            if key not in known and key not in _ADAMW_ALIASES:
                raise ValueError(f"unknown optimizer.params.{key}; valid keys: {sorted(known | set(_ADAMW_ALIASES))}")
            if value == "auto" and key not in _AUTO_VALUED:
                raise ValueError(
                    f"optimizer.params.{key} is \"auto\", which nothing filled in: give a value, or let the Hugging "
                    "Face Trainer fill it (it does for lr, weight_decay, betas and eps when the config goes through "
                    "TrainingArguments(deepspeed=...))"
                )
        for alias, key in _ADAMW_ALIASES.items():
            if alias in params:
                if key in params:
                    raise ValueError(f"optimizer.params gives both {alias} and {key} (the same setting); keep one")
                params[key] = params.pop(alias)
                check_hyperparameters({key: params[key]}, spelling={key: f"optimizer.params.{alias}"})
        return cls(**params)

    def optimizer_kwargs(self) -> dict:
        """Keyword arguments for :class:`muon_megatron.distributed.DistributedMuon` and
        :class:`muon_megatron.Muon`: every hyper-parameter (the fields named as the core names them)."""
        return dict({key: getattr(self, key) for key in HYPERPARAMETERS}, ns_dtype=resolve_dtype(self.ns_dtype))


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


def _offload_device(zero: dict, key: str) -> str:
    return str((zero.get(key) or {}).get("device", "none") or "none").lower()


def check_supported(config: dict) -> None:
    """Refuse, with the fix, what the adapter does not implement (never fall back silently).

    Supported: ZeRO stages 0-3; ``offload_optimizer`` to the CPU at stages 1-3 (momentum and fp32
    masters on the CPU, Newton-Schulz on the accelerator); ``offload_param`` to the CPU at stage 3;
    bf16 with ``data_types.grad_accum_dtype`` fp32 (DeepSpeed's BF16_Optimizer at stage 1).
    Refused: NVMe offload, partial (``ratio`` < 1) and ``super_offload`` optimizer offload (they
    need DeepSpeed's CPU Adam), ``zero_force_ds_cpu_optimizer: true`` with offload, MiCS, and
    ``elastic_checkpoint``.
    """
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage {stage}: DeepSpeed has stages 0, 1, 2 and 3")
    zero = _zero_section(config)
    fix = "or keep DeepSpeed's built-in Muon with optimizer.params.implementation = \"deepspeed\""
    optimizer_device = _offload_device(zero, "offload_optimizer")
    if optimizer_device != "none":
        section = zero.get("offload_optimizer") or {}
        if optimizer_device != "cpu":
            raise ValueError(
                f"zero_optimization.offload_optimizer.device {optimizer_device!r} is not supported by muon_megatron's "
                f"DeepSpeed Muon (its momentum is not swapped by DeepSpeed's NVMe swapper): use \"cpu\", {fix}"
            )
        if stage == 0:
            raise ValueError("zero_optimization.offload_optimizer needs zero_optimization.stage 1, 2 or 3")
        if float(section.get("ratio", 1.0)) != 1.0:
            raise ValueError(
                f"zero_optimization.offload_optimizer.ratio {section['ratio']} (partial offload) needs DeepSpeed's CPU "
                f"Adam for the part left on the accelerator: remove ratio (offload everything), {fix}"
            )
        if section.get("super_offload"):
            raise ValueError(f"zero_optimization.offload_optimizer.super_offload is not supported: remove it, {fix}")
        if config.get("zero_force_ds_cpu_optimizer", False) is True:
            raise ValueError(
                "zero_force_ds_cpu_optimizer is true, which makes DeepSpeed refuse any optimizer but its CPU Adam "
                "under offload_optimizer: remove the key (muon_megatron sets it to false)"
            )
    param_device = _offload_device(zero, "offload_param")
    if param_device != "none" and (stage != 3 or param_device != "cpu"):
        raise ValueError(
            f"zero_optimization.offload_param (device {param_device!r}) is supported by muon_megatron's DeepSpeed Muon "
            f"with device \"cpu\" at zero_optimization.stage 3 only (stage {stage} here): remove it, {fix}"
        )
    if stage == 3 and int(zero.get("mics_shard_size", -1) or -1) > 0:
        raise ValueError(
            "zero_optimization.mics_shard_size (MiCS) is not supported by muon_megatron's DeepSpeed Muon: remove "
            f"it, {fix}"
        )
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            "zero_optimization.elastic_checkpoint is not supported by muon_megatron's DeepSpeed Muon; remove it "
            "(to change the data-parallel size, convert with python -m muon_megatron.deepspeed.universal instead)"
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
            qk_keys = sorted(k for k in params if k.startswith("qk_clip_"))
            if qk_keys and str(config["optimizer"].get("type", "")).lower() == "muon":
                raise ValueError(
                    f"optimizer.params.{qk_keys[0]}: QK-Clip is muon_megatron's; DeepSpeed's built-in Muon "
                    "(implementation \"deepspeed\") has none. Remove the qk_clip_* keys or the implementation key"
                )
        return config, None
    muon = MuonConfig.from_params(config["optimizer"].get("params"))
    check_supported(config)
    ds_config = {k: v for k, v in config.items() if k != "optimizer"}
    if zero_stage(config) > 0:
        ds_config["zero_allow_untested_optimizer"] = True
    if _offload_device(_zero_section(config), "offload_optimizer") != "none":
        ds_config["zero_force_ds_cpu_optimizer"] = False  # DeepSpeed's CPU Adam is not what runs
    return ds_config, muon
