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
from typing import Mapping, Optional, Sequence

import torch

from ..core.qk_clip import QKClipLayer
from ..core.routing import muon_param_groups
from ..core.splits import SplitSpec
from .config import MuonConfig, load_config, split_config, wants_our_muon, zero_stage
from .optimizer import DeepSpeedMuon
from .qk_clip import QKClip, check_parallelism, resolve_layers
from .translate import (
    TensorParallel,
    check_model,
    check_tensor_parallel_zero3,
    data_parallel_group,
    describe,
    expert_group_name,
    guard_zero_checkpoint_loading,
    install_zero3_universal_loading,
    shape_view,
)

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
    DeepSpeed's ZeRO requires. Parameters partitioned by ZeRO-3 (a model built under
    ``deepspeed.zero.Init``) are routed by their real shapes, ``ds_shape``."""
    view = shape_view(model)
    groups = muon_param_groups(view[0] if view else model, adamw=config.adamw, muon=config.muon, splits=splits)
    if view is not None:
        for g in groups:
            g["params"] = [view[1][id(p)] for p in g["params"]]
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
               *, config=None, config_params=None, splits: Optional[Mapping[str, SplitSpec]] = None,
               qk_clip_layers: Optional[Sequence[QKClipLayer]] = None, **kwargs):
    """``deepspeed.initialize`` with ``"type": "muon"`` meaning muon_megatron's Muon.

    Same arguments and return value as ``deepspeed.initialize``; ``splits`` maps parameter-name
    patterns to :class:`SplitSpec` (e.g. a fused QKV weight); ``qk_clip_layers`` declares the
    model's attention layers for QK-Clip (``optimizer.params.qk_clip_threshold``) when the model
    has no ``qk_clip_layers()`` method of its own (see :mod:`.qk_clip`). With our Muon selected the config's
    optimizer section is read into a :class:`MuonConfig`, a :class:`DeepSpeedMuon` is passed to
    DeepSpeed as the client optimizer, and once the engine exists it is bound to DeepSpeed's
    partitions. Raises ValueError at once for unsupported settings (see
    :func:`.config.check_supported`; ZeRO-3 with a tensor-parallel ``mpu``) and for ``optimizer=``
    given together with a ``"muon"`` config.
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
    loaded = load_config(config)
    notice = builtin_muon_notice(loaded)
    if notice:
        logger.warning(notice)
    ds_config, muon = split_config(loaded)
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
    check_tensor_parallel_zero3(kwargs.get("mpu"), zero_stage(ds_config))
    groups = build_param_groups(model, muon, splits=splits, model_parameters=model_parameters)
    layers = None
    if muon.qk_clip:
        check_parallelism(tensor_parallel_size=TensorParallel.from_mpu(kwargs.get("mpu")).size,
                          sequence_parallel_size=int(ds_config.get("sequence_parallel_size", 1) or 1))
        layers = resolve_layers(model, qk_clip_layers, groups)
    elif qk_clip_layers is not None:
        logger.warning("muon_megatron: qk_clip_layers given but optimizer.params.qk_clip_threshold is not set: QK-Clip "
                       "is off")
    client = DeepSpeedMuon(groups, muon)
    engine, ds_optimizer, loader, scheduler = ds_init(args=args, model=model, optimizer=client, config=ds_config,
                                                      **kwargs)
    pieces, wrapper = describe(engine, client)
    client.bind(pieces, wrapper)
    if layers is not None:
        # the engine may take sequence parallelism from an mpu rather than the config
        check_parallelism(sequence_parallel_size=int(getattr(engine, "sequence_parallel_size", 1)))
        qk_clip = QKClip(layers, muon, engine=engine, pieces=pieces, process_group=data_parallel_group(engine))
        qk_clip.install_hooks(model)
        client.attach_qk_clip(qk_clip)
        logger.info("muon_megatron: QK-Clip on %d attention layers (tau %g, alpha %g, GQA rule %s)", len(layers),
                    qk_clip.tau, qk_clip.alpha, qk_clip.gqa_rule)
    if wrapper.startswith("ZeRO-3"):
        guard_zero_checkpoint_loading(engine.optimizer, client, "optimizer_state_dict")
        install_zero3_universal_loading(engine.optimizer, client)
    elif not wrapper.startswith("ZeRO-0"):
        guard_zero_checkpoint_loading(engine.optimizer, client)
    logger.info("muon_megatron: Moonlight Muon active under %s (%d param groups)", wrapper, len(groups))
    return engine, ds_optimizer, loader, scheduler


def builtin_muon_notice(config: dict) -> Optional[str]:
    """The one line said at start-up when a config asks for Muon but keeps DeepSpeed's built-in
    (``"implementation": "deepspeed"``) although this package is active; None otherwise."""
    section = config.get("optimizer") or {}
    if str(section.get("type", "")).lower() != "muon" or wants_our_muon(config):
        return None
    return ("muon_megatron is active, but optimizer.params.implementation = \"deepspeed\" selects DeepSpeed's built-in "
            "Muon (Keller's update scale, so AdamW's lr does not carry over; no tensor-parallel shards): remove that "
            "key for Moonlight's Muon")


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
