"""The framework-free core: imports torch only (an import test keeps it so)."""

from .adamw import adamw_step_
from .base import MuonBase, NonFiniteGradientError, finite_flags
from .hyperparams import HYPERPARAMETERS, MuonHyperparams, check_hyperparameters, resolve_dtype
from .newton_schulz import NS_COEFFICIENTS, newton_schulz, ns_flops, resolve_coefficients
from .optimizer import Muon
from .routing import is_muon_parameter, muon_param_groups, route_parameters
from .splits import Block, ExpertStack, FusedQKV, GateUp, LogicalMatrix, SplitSpec, Whole, default_split
from .update import (
    UPDATE_SCALES, apply_orthogonal_, decay_, group_by_shape, momentum_, orthogonalize_batched, update_scale,
)
from .qk_clip import MaxLogitRecorder, QKClipStats, active_recorder, clip_factors, per_head_max_logits

__all__ = [
    "HYPERPARAMETERS", "NS_COEFFICIENTS", "UPDATE_SCALES", "Block", "ExpertStack", "FusedQKV", "GateUp",
    "LogicalMatrix", "Muon", "MuonBase", "MuonHyperparams", "NonFiniteGradientError", "SplitSpec", "Whole",
    "adamw_step_", "apply_orthogonal_", "check_hyperparameters", "decay_", "default_split", "finite_flags",
    "group_by_shape", "is_muon_parameter", "momentum_", "muon_param_groups", "newton_schulz", "ns_flops",
    "orthogonalize_batched", "resolve_coefficients", "resolve_dtype", "route_parameters", "update_scale",
    "MaxLogitRecorder", "QKClipStats", "active_recorder", "clip_factors", "per_head_max_logits",
]
