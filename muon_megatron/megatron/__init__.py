"""muon-megatron's Megatron adapter: Moonlight's Muon as a megatron-core optimizer.

- :func:`get_muon_optimizer`: the programmatic API (megatron-core 0.16 and 0.19), used like
  ``megatron.core.optimizer.get_megatron_optimizer``.
- :func:`install`: makes ``--optimizer muon`` in Megatron's training scripts (megatron-core 0.19,
  whose wheel carries ``megatron/training``) build this optimizer, and adds the ``--muon-*`` flags.
- :class:`MuonSettings`: Muon's own settings with Moonlight's defaults.

Importing this package imports megatron-core lazily: only the functions above touch it.
"""

from .config import MuonSettings
from .factory import get_muon_optimizer
from .state import init_muon_state
from .params import MegatronParam, describe_parameters

__all__ = ["MuonSettings", "MegatronParam", "describe_parameters", "get_muon_optimizer", "init_muon_state", "install"]


def install(*args, **kwargs):
    """See :func:`muon_megatron.megatron.install.install`."""
    from .install import install as _install

    return _install(*args, **kwargs)
