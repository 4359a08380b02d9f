"""``install()``: make ``--optimizer muon`` in Megatron's training scripts build muon-megatron's Muon.

For megatron-core 0.19 (its wheel carries ``megatron/training``). These module attributes of
``megatron.training`` are wrapped, each idempotently and reversibly (:func:`uninstall`):

- ``arguments.add_megatron_arguments``: also adds the ``--muon-*`` flags (see :mod:`.arguments`);
- ``arguments.validate_args``: with ``--optimizer muon`` megatron-core 0.19 turns
  ``--use-distributed-optimizer`` into its layer-wise optimizer and forbids overlapping the param
  all-gather; muon-megatron runs on Megatron's ordinary ``DistributedOptimizer``, so the
  arguments are validated as for Adam, then ``optimizer`` is set back to ``"muon"``;
- ``training.get_megatron_optimizer``: ``config.optimizer == "muon"`` builds
  :func:`get_muon_optimizer` (with a step hook writing the optimizer step time, under
  ``--muon-log-update-rms`` the update RMS per group, and with QK-Clip its max logits and
  clipped heads to Megatron's TensorBoard writer); every other optimizer goes to megatron-core
  unchanged.

QK-Clip (``--muon-qk-clip-threshold``, or megatron-core's ``--qk-clip`` flags, mapped onto ours by
``validate_args``) runs inside the optimizer step (see :mod:`.qk_clip`). megatron-core's own
``args.qk_clip`` is turned off so it does not clip again; with Transformer Engine attention
``--log-max-attention-logit`` is turned on (TE >= 2.9 then returns the max logits), and
``training.clip_qk``, which megatron calls after the step for that log, is wrapped to report the
max logit the optimizer measured instead of clipping.

It also lets megatron-core's local layer spec (``--transformer-impl local``) build multi-latent
attention, which it cannot on its own (see :mod:`.local_spec`).

Call it before ``parse_and_validate_args`` / ``pretrain`` (the launcher in :mod:`.launch` does).
megatron-core 0.16 wheels have no ``megatron.training``: use :func:`get_muon_optimizer` directly.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_ORIGINALS: dict = {}


def install() -> None:
    """Patch ``megatron.training`` as described in the module docstring (idempotent)."""
    from .version import check_megatron_version

    check_megatron_version()
    try:
        from megatron.training import arguments, training
    except ImportError as err:
        raise ImportError(
            "muon_megatron.megatron.install() needs megatron.training (megatron-core >= 0.19 wheels, or a "
            "Megatron-LM checkout on PYTHONPATH); with megatron-core 0.16 build the optimizer with "
            "muon_megatron.megatron.get_muon_optimizer(config, model_chunks)"
        ) from err
    if _ORIGINALS:
        return
    _ORIGINALS["add_megatron_arguments"] = arguments.add_megatron_arguments
    _ORIGINALS["validate_args"] = arguments.validate_args
    _ORIGINALS["get_megatron_optimizer"] = training.get_megatron_optimizer
    arguments.add_megatron_arguments = _add_megatron_arguments
    arguments.validate_args = _validate_args
    training.get_megatron_optimizer = _get_megatron_optimizer
    if hasattr(training, "wrap_model_chunks_with_ddp"):
        _ORIGINALS["wrap_model_chunks_with_ddp"] = training.wrap_model_chunks_with_ddp
        training.wrap_model_chunks_with_ddp = _wrap_model_chunks_with_ddp
    if hasattr(training, "load_checkpoint"):
        _ORIGINALS["load_checkpoint"] = training.load_checkpoint
        training.load_checkpoint = _load_checkpoint
    if hasattr(training, "clip_qk"):
        _ORIGINALS["clip_qk"] = training.clip_qk
        training.clip_qk = _clip_qk
    from .local_spec import install_local_mla

    install_local_mla()  # MLA with --transformer-impl local (see local_spec)
    logger.info("muon-megatron installed: --optimizer muon builds Moonlight's Muon")


def uninstall() -> None:
    """Undo :func:`install` (for tests)."""
    if not _ORIGINALS:
        return
    from megatron.training import arguments, training

    arguments.add_megatron_arguments = _ORIGINALS.pop("add_megatron_arguments")
    arguments.validate_args = _ORIGINALS.pop("validate_args")
    training.get_megatron_optimizer = _ORIGINALS.pop("get_megatron_optimizer")
    if "wrap_model_chunks_with_ddp" in _ORIGINALS:
        training.wrap_model_chunks_with_ddp = _ORIGINALS.pop("wrap_model_chunks_with_ddp")
    if "load_checkpoint" in _ORIGINALS:
        training.load_checkpoint = _ORIGINALS.pop("load_checkpoint")
    if "clip_qk" in _ORIGINALS:
        training.clip_qk = _ORIGINALS.pop("clip_qk")
    _QK_CLIPPED.clear()
    from .local_spec import uninstall_local_mla

    uninstall_local_mla()


# A torch_dist checkpoint written with another optimizer fails inside Megatron's loader with a
# KeyError listing the missing optimizer keys. These markers tell whose state the message is about:
# Muon's model-space keys against Megatron's distributed-optimizer (Adam) keys.
_MUON_KEY_MARK = "momentum_buffer"
_ADAM_KEY_MARKS = ("exp_avg", "optimizer.distributed.")


def _load_checkpoint(ddp_model, optimizer, *args, **kwargs):
    """Megatron's ``load_checkpoint``; a checkpoint whose optimizer state is of the other kind
    (Adam's for a Muon run, Muon's for another optimizer) raises :class:`OptimizerStateMismatch`
    naming ``--no-load-optim`` instead of Megatron's missing-key error."""
    try:
        return _ORIGINALS["load_checkpoint"](ddp_model, optimizer, *args, **kwargs)
    except BaseException as err:  # noqa: BLE001 - re-raised unless it is the mismatch described above
        # (torch.distributed.checkpoint's CheckpointException, which carries the ranks' KeyErrors,
        # derives from BaseException.)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        from megatron.training import get_args

        from .state import state_mismatch_error

        text = str(err)
        if "optimizer" not in text:
            raise
        muon_run = getattr(get_args(), "optimizer", None) == "muon"
        if muon_run and any(mark in text for mark in _ADAM_KEY_MARKS) and _MUON_KEY_MARK not in text:
            raise state_mismatch_error("it holds another optimizer's state, e.g. Adam's exp_avg / exp_avg_sq") from err
        if not muon_run and _MUON_KEY_MARK in text:
            raise state_mismatch_error(f"it holds Muon state and this run's --optimizer is {get_args().optimizer!r}") from err
        raise


def _add_megatron_arguments(parser):
    from .arguments import add_muon_arguments

    return add_muon_arguments(_ORIGINALS["add_megatron_arguments"](parser))


def _validate_args(args, *rest, **kwargs):
    if getattr(args, "optimizer", None) != "muon":
        return _ORIGINALS["validate_args"](args, *rest, **kwargs)
    from .arguments import apply_megatron_qk_clip_, muon_settings_from_args

    muon_settings_from_args(args)  # bad --muon-* values fail here, at start-up
    apply_megatron_qk_clip_(args)  # megatron-core's --qk-clip becomes ours; its own clip stays off
    if getattr(args, "muon_qk_clip_threshold", None) is not None:
        _measure_with_transformer_engine(args)
    if getattr(args, "fp16", False):
        logger.info("muon-megatron: fp16 with loss scaling; gradients are unscaled before momentum and NS")
    args.optimizer = "adam"
    try:
        result = _ORIGINALS["validate_args"](args, *rest, **kwargs)
    finally:
        args.optimizer = "muon"
    args.use_layer_wise_distributed_optimizer = False
    _refuse_wrong_expert_layout(args)
    return result


def _refuse_wrong_expert_layout(args) -> None:
    """At start-up, the layouts this megatron-core trains wrongly (see
    :func:`.params.wrong_expert_layout`; releases before 0.19 mark expert weights as
    expert-parallel only when expert parallel > 1). The optimizer checks the parameters themselves
    again when it is built."""
    from .params import wrong_expert_layout
    from .version import megatron_core_version

    if not getattr(args, "num_experts", None) or megatron_core_version() >= (0, 19):
        return
    tp = args.tensor_model_parallel_size
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp
    why = wrong_expert_layout(tp, etp, getattr(args, "expert_model_parallel_size", 1))
    if why:
        raise ValueError(f"muon-megatron refuses this layout: {why}")


def _measure_with_transformer_engine(args) -> None:
    """QK-Clip with Transformer Engine attention: megatron-core's TEDotProductAttention returns max
    logits (TE >= 2.9's ``return_max_logit``) only under ``--log-max-attention-logit``, which is
    turned on here (ValueError naming the fix for an older or missing TE). The local spec needs
    nothing: forward hooks measure there (see :mod:`.qk_clip`)."""
    if getattr(args, "transformer_impl", "transformer_engine") != "transformer_engine":
        return
    from megatron.core.utils import get_te_version

    found = get_te_version()
    if str(found) == "0.0.0" or found.release < (2, 9):
        what = "is not installed" if str(found) == "0.0.0" else f"is {found}"
        raise ValueError(
            f"--muon-qk-clip-threshold (or --qk-clip) with --transformer-impl transformer_engine takes the max logits "
            f"from Transformer Engine >= 2.9 (return_max_logit); Transformer Engine {what}. Upgrade it, or use "
            "--transformer-impl local"
        )
    if not getattr(args, "log_max_attention_logit", False):
        args.log_max_attention_logit = True
        logger.info("muon-megatron: QK-Clip turns on --log-max-attention-logit (Transformer Engine's max logits)")


# The dense inner optimizers that clip, for megatron's own max-logit log (see _clip_qk).
_QK_CLIPPED: list = []


def _clip_qk(model, log_max_only=False):
    """megatron-core's ``clip_qk`` (run after the optimizer step under ``--qk-clip`` or
    ``--log-max-attention-logit``). With ``--optimizer muon`` the clip already happened in the
    optimizer step and the max logits were consumed there: return the largest max logit it
    measured this step (over this pipeline stage's layers), which megatron logs as
    ``max_attention_logit``, and clip nothing again."""
    from megatron.training import get_args

    if getattr(get_args(), "optimizer", None) != "muon":
        return _ORIGINALS["clip_qk"](model, log_max_only=log_max_only)
    stats = [inner.last_qk_clip for inner in _QK_CLIPPED if inner.last_qk_clip is not None]
    return max((s.max_logit_overall for s in stats), default=0.0)


def _wrap_model_chunks_with_ddp(*args, **kwargs):
    """With ``--optimizer muon --muon-layout aligned``, DDP gets the matrix-aligned buffer layout
    (megatron-core computes layouts through ``DistributedOptimizer.compute_full_param_layout``,
    looked up on the name in ``megatron.training.training`` during this call)."""
    from megatron.training import get_args, training

    margs = get_args()
    if getattr(margs, "optimizer", None) != "muon" or getattr(margs, "muon_layout", "gather") != "aligned":
        return _ORIGINALS["wrap_model_chunks_with_ddp"](*args, **kwargs)
    from .aligned import aligned_param_layout

    original = training.DistributedOptimizer
    aligned = type("MatrixAlignedLayout", (original,), {"compute_full_param_layout": staticmethod(aligned_param_layout)})
    training.DistributedOptimizer = aligned
    try:
        return _ORIGINALS["wrap_model_chunks_with_ddp"](*args, **kwargs)
    finally:
        training.DistributedOptimizer = original


def _get_megatron_optimizer(config, model_chunks, *args, **kwargs):
    if getattr(config, "optimizer", None) != "muon":
        return _ORIGINALS["get_megatron_optimizer"](config, model_chunks, *args, **kwargs)
    from megatron.training import get_args

    from .arguments import muon_settings_from_args
    from .factory import get_muon_optimizer

    if kwargs.get("config_overrides"):
        logger.info(
            "muon-megatron: Megatron's per-parameter config overrides (e.g. no weight decay on biases and "
            "norms) are not applied; Muon and AdamW use the same lr and weight decay everywhere (Moonlight)"
        )
    optimizer = get_muon_optimizer(
        config,
        model_chunks,
        muon_settings_from_args(get_args()),
        use_gloo_process_groups=kwargs.get("use_gloo_process_groups", True),
    )
    from megatron.training import get_tensorboard_writer

    from .inner import MegatronMuon, tensorboard_hook

    hook = tensorboard_hook(get_tensorboard_writer, lambda: getattr(get_args(), "curr_iteration", 0))
    _QK_CLIPPED.clear()
    for part in optimizer.chained_optimizers:
        if isinstance(part.optimizer, MegatronMuon):
            part.optimizer.step_hooks.append(hook)
            if part.optimizer.qk_clip is not None:
                _QK_CLIPPED.append(part.optimizer)
    return optimizer
