"""How ``"optimizer": {"type": "muon"}`` comes to mean muon_megatron's Muon.

Two ways, same effect:

- call :func:`initialize` instead of ``deepspeed.initialize`` (same arguments, plus ``splits=``);
- call :func:`install` once (or ``import muon_megatron.deepspeed.activate``) before the training
  script calls ``deepspeed.initialize``: it replaces that attribute of the ``deepspeed`` module
  with :func:`initialize` (a name imported earlier with ``from deepspeed import initialize`` is not
  replaced). :func:`uninstall` restores DeepSpeed's.

Either way a config whose optimizer is not ``"muon"``, or that sets
``"params": {"implementation": "deepspeed"}``, goes to DeepSpeed untouched (minus that key), so
DeepSpeed's built-in MuonWithAuxAdam stays one switch away.
"""

from __future__ import annotations

import copy
import logging
from typing import Mapping, Optional

import torch

from ..core.routing import muon_param_groups
from ..core.splits import SplitSpec
from .config import MuonConfig, load_config, split_config
from .optimizer import DeepSpeedMuon
from .translate import check_model, describe, expert_group_name, guard_zero_checkpoint_loading

logger = logging.getLogger(__name__)

_original_initialize = None


def _deepspeed_initialize():
    import deepspeed

    return _original_initialize or deepspeed.initialize


def build_param_groups(
    model: torch.nn.Module,
    config: MuonConfig,
    *,
    splits: Optional[Mapping[str, SplitSpec]] = None,
    model_parameters=None,
) -> list[dict]:
    """Moonlight routing (:func:`muon_megatron.muon_param_groups`) of ``model``'s trainable
    parameters, limited to ``model_parameters`` when given (tensors only), with DeepSpeed MoE
    expert parameters in groups of their own (``moe=True``, ``name`` = their expert group), as
    DeepSpeed's ZeRO requires."""
    groups = muon_param_groups(model, adamw=config.adamw, muon=config.muon, splits=splits)
    if model_parameters is not None:
        chosen = list(model_parameters)
        if any(isinstance(p, dict) for p in chosen):
            raise ValueError(
                "muon_megatron's DeepSpeed Muon builds its own param groups; pass model_parameters as tensors "
                "(or not at all) and route parameters with optimizer.params.adamw / muon patterns"
            )
        keep = {id(p) for p in chosen}
        for g in groups:
            pairs = [(p, n) for p, n in zip(g["params"], g["names"]) if id(p) in keep]
            g["params"], g["names"] = [p for p, _ in pairs], [n for _, n in pairs]
        groups = [g for g in groups if g["params"]]
    out = []
    for g in groups:
        by_expert: dict[Optional[str], dict] = {}
        for p, n in zip(g["params"], g["names"]):
            key = expert_group_name(p)
            sub = by_expert.setdefault(key, dict(g, params=[], names=[]))
            sub["params"].append(p)
            sub["names"].append(n)
        for key, sub in by_expert.items():
            if key is not None:
                sub["moe"], sub["name"] = True, key
            out.append(sub)
    return out


def initialize(args=None, model: Optional[torch.nn.Module] = None, optimizer=None, model_parameters=None,
               *, config=None, config_params=None, splits: Optional[Mapping[str, SplitSpec]] = None, **kwargs):
    """``deepspeed.initialize`` with ``"type": "muon"`` meaning muon_megatron's Muon.

    Same arguments and return value as ``deepspeed.initialize``; ``splits`` maps parameter-name
    patterns to :class:`SplitSpec` (e.g. a fused QKV weight). With our Muon selected the config's
    optimizer section is read into a :class:`MuonConfig`, a :class:`DeepSpeedMuon` is passed to
    DeepSpeed as the client optimizer, and once the engine exists it is bound to DeepSpeed's
    partitions. Raises ValueError at once for unsupported settings (ZeRO-3, offload) and for
    ``optimizer=`` given together with a ``"muon"`` config.
    """
    ds_init = _deepspeed_initialize()
    if config is None and config_params is not None:
        config, config_params = config_params, None
    if config is None and getattr(args, "deepspeed_config", None) is not None:
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None
    if config is None:
        return ds_init(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, **kwargs)
    ds_config, muon = split_config(load_config(config))
    if muon is None:
        return ds_init(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                       config=ds_config, **kwargs)
    if optimizer is not None:
        raise ValueError(
            "both optimizer= and a config optimizer of type \"muon\" were given; drop one (DeepSpeed would "
            "silently prefer the client optimizer)"
        )
    if model is None:
        raise ValueError("initialize needs model= to route its parameters between Muon and AdamW")
    check_model(model)
    groups = build_param_groups(model, muon, splits=splits, model_parameters=model_parameters)
    client = DeepSpeedMuon(groups, muon)
    engine, ds_optimizer, loader, scheduler = ds_init(args=args, model=model, optimizer=client, config=ds_config,
                                                      **kwargs)
    pieces, wrapper = describe(engine, client)
    client.bind(pieces, wrapper)
    if wrapper in ("ZeRO-1", "ZeRO-2"):
        guard_zero_checkpoint_loading(engine.optimizer, client)
    logger.info("muon_megatron: Moonlight Muon active under %s (%d param groups)", wrapper, len(groups))
    return engine, ds_optimizer, loader, scheduler


def install() -> None:
    """Make ``deepspeed.initialize`` route ``"type": "muon"`` here (idempotent)."""
    global _original_initialize
    import deepspeed

    if _original_initialize is None:
        _original_initialize = deepspeed.initialize
        deepspeed.initialize = initialize
        logger.info("muon_megatron: deepspeed.initialize now selects muon_megatron's Muon for \"type\": \"muon\"")


def uninstall() -> None:
    """Restore DeepSpeed's own ``deepspeed.initialize``."""
    global _original_initialize
    import deepspeed

    if _original_initialize is not None:
        deepspeed.initialize = _original_initialize
        _original_initialize = None


def installed() -> bool:
    return _original_initialize is not None
