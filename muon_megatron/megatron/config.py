"""``MuonSettings``: the Muon half of the configuration, validated at construction.

Megatron's own ``OptimizerConfig`` keeps what it already owns (lr, min_lr, weight_decay, Adam
betas and eps, clipping, precision, the distributed optimizer); these settings hold what is
specific to Muon. :func:`muon_settings_from_args` builds them from parsed ``--muon-*`` flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core.hyperparams import MuonHyperparams, check_hyperparameters, dtype_name, resolve_dtype
from ..core.newton_schulz import NS_COEFFICIENTS
from ..core.qk_clip import GQA_RULES, validate_qk_clip
from ..kernels.orthogonalize import check_backend_name

LAYOUTS = ("gather", "aligned")
_DEFAULTS = MuonHyperparams()

#: The flag of each hyper-parameter these settings hold (for messages).
FLAG_OF = {
    "momentum": "--muon-momentum",
    "nesterov": "--muon-nesterov",
    "ns_steps": "--muon-num-ns-steps",
    "ns_coefficients": "--muon-coefficient-type",
    "ns_dtype": "--muon-ns-dtype",
    "update_scale": "--muon-scale-mode",
}


@dataclass(frozen=True, kw_only=True)
class MuonSettings:
    """Moonlight's defaults (arXiv 2502.16982); every field is checked in ``__post_init__``."""

    momentum: float = _DEFAULTS.momentum
    """Muon momentum mu, sum form ``buf = mu * buf + g``."""
    nesterov: bool = _DEFAULTS.nesterov
    """Feed ``g + mu * buf`` (True) or ``buf`` (False) to Newton-Schulz."""
    ns_steps: int = _DEFAULTS.ns_steps
    """Newton-Schulz iterations."""
    ns_coefficients: str = _DEFAULTS.ns_coefficients
    """Coefficient set: a name in ``muon_megatron.core.newton_schulz.NS_COEFFICIENTS``."""
    ns_dtype: str = dtype_name(_DEFAULTS.ns_dtype)
    """Newton-Schulz compute dtype ("bfloat16" or "float32")."""
    update_scale: str = _DEFAULTS.update_scale
    """Update scale: "moonlight" (0.2 sqrt(max(A, B))), "keller", "spectral" or "none"."""
    extra_scale_factor: float = 1.0
    """Multiplies the update of every Muon matrix (megatron-core's --muon-extra-scale-factor).
    Only 1.0 is implemented; another value is refused at construction."""
    split_qkv: bool = True
    """Orthogonalise q, k and v of a fused QKV weight as separate matrices (Moonlight)."""
    split_fc1: bool = True
    """Orthogonalise gate and up of a fused SwiGLU fc1 weight as separate matrices (Moonlight)."""
    adamw_params: tuple[str, ...] = ()
    """fnmatch patterns of parameter names forced onto AdamW."""
    muon_params: tuple[str, ...] = ()
    """fnmatch patterns of parameter names forced onto Muon (must be 2-D or splittable)."""
    layout: str = "gather"
    """How Muon pieces reach their owner: "gather" (Megatron's default buffer layout; pieces are
    sent to one owner per matrix) or "aligned" (megatron-core >= 0.19: the DDP buffers are laid
    out so that each matrix lies whole in one DP shard, see :mod:`.aligned`; applied by
    ``install()``, or by passing ``aligned_param_layout`` to DDP yourself)."""
    pipeline_exchange: bool = False
    """Exchange the Newton-Schulz pieces in one stage per chunk, each stage's collectives posted
    one stage ahead (``DistributedMuon``'s ``pipeline_exchange``): for links slow against
    Newton-Schulz. Off by default: on two NVLink H200s the single exchange was faster."""
    log_update_rms: bool = False
    """Compute and log the update RMS per param group every step (one extra all-reduce)."""
    ns_backend: str = "auto"
    """Newton-Schulz implementation: "auto" (on CUDA the fastest of ``muon_megatron.kernels``'
    backends, timed once per bucket shape; elsewhere the batched torch path), "torch" (always the
    batched torch path) or a name in ``muon_megatron.kernels.NS_BACKENDS``."""
    qk_clip_threshold: Optional[float] = None
    """QK-Clip (Kimi K2's MuonClip) threshold tau: after each step, the query/key weights of every
    attention head whose max pre-softmax logit exceeded tau are scaled so that it would have been
    tau (see :mod:`.qk_clip`). None (default, as Moonlight): off."""
    qk_clip_alpha: float = 0.5
    """Share of the clip on the query side: queries scale by ``gamma ** alpha``, keys by
    ``gamma ** (1 - alpha)`` (megatron-core's ``qk_clip_alpha``; 0.5 = sqrt(gamma) each)."""
    qk_clip_gqa_rule: str = "per_head"
    """How query heads sharing a key head are clipped (GQA): "per_head" (each head's logits scale by
    its own gamma) or "group" (megatron-core's rule: the group's smallest gamma for all of them).
    See :mod:`muon_megatron.core.qk_clip`."""

    def __post_init__(self):
        if not isinstance(self.ns_coefficients, str) or self.ns_coefficients not in NS_COEFFICIENTS:
            raise ValueError(
                f"--muon-coefficient-type {self.ns_coefficients!r} is not known to muon-megatron; "
                f"choose one of {sorted(NS_COEFFICIENTS)}"
            )
        values = {k: getattr(self, k) for k in FLAG_OF}
        check_hyperparameters(values, spelling=FLAG_OF)
        if self.extra_scale_factor != 1.0:
            raise ValueError(
                f"--muon-extra-scale-factor {self.extra_scale_factor} is not supported by muon-megatron; "
                "leave it at 1.0 and scale the learning rate, or pick another --muon-scale-mode"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"--muon-layout {self.layout!r}: choose one of {LAYOUTS}")
        check_backend_name(self.ns_backend, "--muon-ns-backend")
        self._check_qk_clip()
        object.__setattr__(self, "adamw_params", tuple(self.adamw_params))
        object.__setattr__(self, "muon_params", tuple(self.muon_params))

    def _check_qk_clip(self) -> None:
        if self.qk_clip_threshold is not None:
            try:
                validate_qk_clip(self.qk_clip_threshold)
            except ValueError as err:
                raise ValueError(f"--muon-qk-clip-threshold {self.qk_clip_threshold!r}: {err}; leave it unset to turn "
                                 "QK-Clip off") from None
        try:
            validate_qk_clip(1.0, self.qk_clip_alpha)
        except ValueError as err:
            raise ValueError(f"--muon-qk-clip-alpha {self.qk_clip_alpha!r}: {err}") from None
        if self.qk_clip_gqa_rule not in GQA_RULES:
            raise ValueError(f"--muon-qk-clip-gqa-rule {self.qk_clip_gqa_rule!r}: choose one of {GQA_RULES}")

    @property
    def torch_ns_dtype(self) -> torch.dtype:
        return resolve_dtype(self.ns_dtype)

    def optimizer_kwargs(self) -> dict:
        """Keyword arguments for ``muon_megatron.Muon`` / ``DistributedMuon``: the
        hyper-parameters of :data:`FLAG_OF` (lr, weight decay and AdamW's betas and eps come from
        Megatron's ``OptimizerConfig``)."""
        return dict({key: getattr(self, key) for key in FLAG_OF}, ns_dtype=self.torch_ns_dtype)
