"""The functions that patched engine trees call (the only muon_megatron names the patches use).

Keep these signatures stable: forks carry patches that call them. Each delegates to an engine
adapter (:mod:`muon_megatron.megatron`, :mod:`muon_megatron.deepspeed`); none holds optimizer code.

megatron-core (``megatron/core/optimizer/__init__.py``, ``megatron/training/arguments.py``):

- :func:`get_megatron_muon_optimizer` — ``get_megatron_optimizer`` with ``config.optimizer == "muon"``;
- :func:`add_muon_arguments` — the ``--muon-*`` flags, added after Megatron's own;
- :func:`validate_muon_args` — ``validate_args`` with ``--optimizer muon``.

DeepSpeed (``deepspeed/__init__.py``):

- :func:`deepspeed_selects_muon` / :func:`deepspeed_initialize` — ``deepspeed.initialize`` with
  ``"optimizer": {"type": "muon"}``.
"""

from __future__ import annotations

import sys
import threading

# ---------------------------------------------------------------------------------------------
# megatron-core

#: The first megatron-core line the adapter builds on (measured: 0.12.3-0.14.0 lack
#: ``ProcessGroupCollection``; 0.15.3 trains). The 0.12-0.15 patch set hooks every release of its
#: line in, so that forks get this message rather than an ImportError from inside the adapter.
ADAPTER_LOWEST_MEGATRON_CORE = (0, 15)


def _megatron_settings():
    """Muon settings from Megatron's parsed ``--muon-*`` flags when a training script parsed them
    (megatron.training already imported and its args set), else Moonlight's defaults."""
    from ..megatron.config import MuonSettings

    global_vars = sys.modules.get("megatron.training.global_vars")  # never import megatron.training here
    args = getattr(global_vars, "_GLOBAL_ARGS", None) if global_vars is not None else None
    if args is None or not hasattr(args, "muon_ns_dtype"):
        return MuonSettings()
    from ..megatron.arguments import muon_settings_from_args

    return muon_settings_from_args(args)


def get_megatron_muon_optimizer(config, model_chunks, *, use_gloo_process_groups: bool = True):
    """What a patched ``get_megatron_optimizer`` returns for ``config.optimizer == "muon"``:
    :func:`muon_megatron.megatron.get_muon_optimizer` with the ``--muon-*`` settings when a
    training script parsed them, Moonlight's defaults otherwise (programmatic use). megatron-core's
    own ``muon_*`` fields of ``OptimizerConfig`` are not read (their defaults are not Moonlight's)."""
    from megatron.core import package_info

    found = (int(package_info.MAJOR), int(package_info.MINOR))
    if found < ADAPTER_LOWEST_MEGATRON_CORE:
        raise RuntimeError(
            f"--optimizer muon: this tree is megatron-core {package_info.__version__}, patched, but "
            "muon_megatron's Megatron adapter needs megatron-core >= "
            f"{'.'.join(map(str, ADAPTER_LOWEST_MEGATRON_CORE))} (it builds its process groups with "
            "ProcessGroupCollection). Upgrade the engine, or use another optimizer on this release."
        )
    from ..megatron.factory import get_muon_optimizer

    return get_muon_optimizer(
        config, model_chunks, _megatron_settings(), use_gloo_process_groups=use_gloo_process_groups
    )


def add_muon_arguments(parser):
    """The ``--muon-*`` flags on Megatron's parser (reconciled with Megatron's own Muon flags)."""
    from ..megatron.arguments import add_muon_arguments as add

    return add(parser)


def validate_muon_args(validate_args, args, defaults=None):
    """``validate_args`` for ``--optimizer muon``: our flags are checked first (a bad value fails
    at start-up), then the arguments are validated as for Adam, since muon-megatron runs on
    Megatron's ordinary (distributed) optimizer, not megatron-core's layer-wise one. ``validate_args``
    is the patched function itself; it is re-entered with ``optimizer == "adam"``."""
    from ..megatron.arguments import muon_settings_from_args

    muon_settings_from_args(args)
    args.optimizer = "adam"
    try:
        result = validate_args(args, {} if defaults is None else defaults)
    finally:
        args.optimizer = "muon"
    args.use_layer_wise_distributed_optimizer = False
    return result


# ---------------------------------------------------------------------------------------------
# DeepSpeed

_DEEPSPEED = threading.local()


def _deepspeed_config(call: dict):
    config = call.get("config")
    if config is None:
        config = call.get("config_params")
    if config is None:
        config = getattr(call.get("args"), "deepspeed_config", None)
    return config


def deepspeed_selects_muon(call: dict) -> bool:
    """True when a patched ``deepspeed.initialize`` called with ``call`` (its arguments by name)
    must go to muon_megatron: the config's optimizer type is ``"muon"`` (either implementation:
    muon_megatron also removes its own ``implementation`` key before DeepSpeed sees the config),
    and this is not muon_megatron's own inner call."""
    if getattr(_DEEPSPEED, "depth", 0):
        return False
    config = _deepspeed_config(call)
    if config is None:
        return False
    from ..deepspeed.config import load_config

    try:
        section = load_config(config).get("optimizer") or {}
    except (TypeError, OSError, ValueError):
        return False  # DeepSpeed reports a config it cannot read in its own words
    return str(section.get("type", "")).lower() == "muon"


def deepspeed_initialize(call: dict):
    """:func:`muon_megatron.deepspeed.initialize` with the arguments of the patched
    ``deepspeed.initialize``; its inner call to ``deepspeed.initialize`` runs DeepSpeed's own code."""
    from ..deepspeed.activation import initialize

    _DEEPSPEED.depth = getattr(_DEEPSPEED, "depth", 0) + 1
    try:
        return initialize(**call)
    finally:
        _DEEPSPEED.depth -= 1
