"""muon-megatron: Moonlight's Muon for Megatron-LM and DeepSpeed.

The core (``muon_megatron.core``, re-exported here) imports torch only. Engine adapters live in
``muon_megatron.megatron`` and ``muon_megatron.deepspeed`` and are imported on demand.
"""

from .core import *  # noqa: F401,F403
from .core import __all__

__version__ = "0.1.0"
