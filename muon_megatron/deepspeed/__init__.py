"""DeepSpeed adapter: ``"optimizer": {"type": "muon"}`` as Moonlight's Muon under ZeRO 0 to 3.

Activate it in one of two ways (see :mod:`.activation`)::

    import muon_megatron.deepspeed as mmds
    engine, optimizer, _, _ = mmds.initialize(model=model, config=ds_config)   # a wrapper

    import muon_megatron.deepspeed.activate   # or: mmds.install(); then plain deepspeed.initialize

``"params": {"implementation": "deepspeed"}`` keeps DeepSpeed's built-in Muon. The keys of
``optimizer.params`` are those of :class:`MuonConfig`. Modules: :mod:`.config` (the config
section), :mod:`.optimizer` (the client optimizer), :mod:`.translate` (DeepSpeed's partitions in
the distributed engine's terms; the only module reading DeepSpeed internals), :mod:`.activation`,
:mod:`.qk_clip` (MuonClip: ``optimizer.params.qk_clip_threshold`` and the models' layer
declarations, :class:`QKClipLayer`).
Imports torch, ``muon_megatron`` core/distributed and DeepSpeed (lazily), never Megatron.
"""

from ..core.qk_clip import QKClipLayer
from .activation import build_param_groups, initialize, install, installed, uninstall
from .config import MuonConfig, split_config
from .optimizer import DeepSpeedMuon, ForeignOptimizerStateError

__all__ = [
    "DeepSpeedMuon", "ForeignOptimizerStateError", "MuonConfig", "QKClipLayer", "build_param_groups", "initialize",
    "install", "installed", "split_config", "uninstall",
]
