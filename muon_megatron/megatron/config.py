"""``MuonSettings``: the Muon half of the configuration, validated at construction.

Megatron's own ``OptimizerConfig`` keeps what it already owns (lr, min_lr, weight_decay, Adam
betas and eps, clipping, precision, the distributed optimizer); these settings hold what is
specific to Muon. :func:`muon_settings_from_args` builds them from parsed ``--muon-*`` flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.newton_schulz import NS_COEFFICIENTS, resolve_coefficients
from ..core.optimizer import resolve_dtype
from ..core.update import UPDATE_SCALES
from ..kernels.orthogonalize import check_backend_name

LAYOUTS = ("gather", "aligned")


@dataclass(frozen=True, kw_only=True)
class MuonSettings:
    """Moonlight's defaults (arXiv 2502.16982); every field is checked in ``__post_init__``."""

    momentum: float = 0.95
    """Muon momentum mu, sum form ``buf = mu * buf + g``."""
    nesterov: bool = True
    """Feed ``g + mu * buf`` (True) or ``buf`` (False) to Newton-Schulz."""
    ns_steps: int = 5
    """Newton-Schulz iterations."""
    ns_coefficients: str = "moonlight"
    """Coefficient set: a name in ``muon_megatron.core.newton_schulz.NS_COEFFICIENTS``."""
    ns_dtype: str = "bfloat16"
    """Newton-Schulz compute dtype ("bfloat16" or "float32")."""
    update_scale: str = "moonlight"
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
    log_update_rms: bool = False
    """Compute and log the update RMS per param group every step (one extra all-reduce)."""
    ns_backend: str = "auto"
    """Newton-Schulz implementation: "auto" (on CUDA the fastest of ``muon_megatron.kernels``'
    backends, timed once per bucket shape; elsewhere the batched torch path), "torch" (always the
    batched torch path) or a name in ``muon_megatron.kernels.NS_BACKENDS``."""

    def __post_init__(self):
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"--muon-momentum must be in [0, 1), got {self.momentum}")
        if isinstance(self.ns_steps, bool) or not isinstance(self.ns_steps, int) or self.ns_steps < 1:
            raise ValueError(f"--muon-num-ns-steps must be a positive integer, got {self.ns_steps!r}")
        if self.ns_coefficients not in NS_COEFFICIENTS:
            raise ValueError(
                f"--muon-coefficient-type {self.ns_coefficients!r} is not known to muon-megatron; "
                f"choose one of {sorted(NS_COEFFICIENTS)}"
            )
        resolve_coefficients(self.ns_coefficients, self.ns_steps)
        if resolve_dtype(self.ns_dtype) not in (torch.bfloat16, torch.float32, torch.float16, torch.float64):
            raise ValueError(f"--muon-ns-dtype {self.ns_dtype!r} is not a floating dtype")
        if self.update_scale not in UPDATE_SCALES:
            raise ValueError(
                f"--muon-scale-mode {self.update_scale!r} is not known to muon-megatron; "
                f"choose one of {sorted(UPDATE_SCALES)}"
            )
        if self.extra_scale_factor != 1.0:
            raise ValueError(
                f"--muon-extra-scale-factor {self.extra_scale_factor} is not supported by muon-megatron; "
                "leave it at 1.0 and scale the learning rate, or pick another --muon-scale-mode"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"--muon-layout {self.layout!r}: choose one of {LAYOUTS}")
        check_backend_name(self.ns_backend, "--muon-ns-backend")
        object.__setattr__(self, "adamw_params", tuple(self.adamw_params))
        object.__setattr__(self, "muon_params", tuple(self.muon_params))

    @property
    def torch_ns_dtype(self) -> torch.dtype:
        return resolve_dtype(self.ns_dtype)

    def optimizer_kwargs(self) -> dict:
        """Keyword arguments for ``muon_megatron.Muon`` / ``DistributedMuon`` (hand-written map)."""
        return dict(
            momentum=self.momentum,
            nesterov=self.nesterov,
            ns_steps=self.ns_steps,
            ns_coefficients=self.ns_coefficients,
            ns_dtype=self.torch_ns_dtype,
            update_scale=self.update_scale,
        )
