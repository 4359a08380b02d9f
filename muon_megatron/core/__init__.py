"""The framework-free core: imports torch only (an import test keeps it so)."""

from .newton_schulz import NS_COEFFICIENTS, newton_schulz, ns_flops, resolve_coefficients
from .optimizer import Muon, NonFiniteGradientError, adamw_step_, resolve_dtype, validate_hyperparameters
from .routing import is_muon_parameter, muon_param_groups, route_parameters
from .splits import Block, ExpertStack, FusedQKV, GateUp, LogicalMatrix, SplitSpec, Whole, default_split
from .update import UPDATE_SCALES, apply_update_, momentum_, orthogonalize_batched, scaled_update, update_scale

__all__ = [
    "NS_COEFFICIENTS", "UPDATE_SCALES", "Block", "ExpertStack", "FusedQKV", "GateUp", "LogicalMatrix", "Muon",
    "NonFiniteGradientError", "SplitSpec", "Whole", "adamw_step_", "apply_update_", "default_split",
    "is_muon_parameter", "momentum_", "muon_param_groups", "newton_schulz", "ns_flops", "orthogonalize_batched",
    "resolve_coefficients", "resolve_dtype", "route_parameters", "scaled_update", "update_scale",
    "validate_hyperparameters",
]
