"""Model descriptions: Moonlight-16B-A3B and Moonlight-mini as pure data.

- :mod:`.spec`: ``ModelSpec`` (architecture), ``weights(spec)`` (every trainable tensor with its
  split, routing and tensor-parallel cut), ``count_params``.
- :mod:`.moonlight`: the registered models (``MODELS``, ``get_model``).
- :mod:`.argfile`: a ``ModelSpec`` from Megatron ``pretrain_gpt.py`` flags.
- :mod:`.megatron_config`: megatron-core configs, models and launch flags (imports megatron only
  inside its functions).
"""

from .argfile import ParallelArgs, read_argument_file, spec_from_megatron_args
from .moonlight import MODELS, MOONLIGHT_16B_A3B, MOONLIGHT_MINI, MOONLIGHT_MINI_GPU, get_model
from .spec import MLASpec, ModelSpec, MoESpec, ParamCounts, Weight, count_params, weights

__all__ = [
    "MLASpec", "MODELS", "MOONLIGHT_16B_A3B", "MOONLIGHT_MINI", "MOONLIGHT_MINI_GPU", "ModelSpec", "MoESpec",
    "ParallelArgs", "ParamCounts", "Weight", "count_params", "get_model", "read_argument_file",
    "spec_from_megatron_args", "weights",
]
