"""The ``--muon-*`` flags: added to any argparse parser, reconciled with megatron-core's own.

megatron-core 0.19 already defines some Muon flags for its own Muon (``--muon-momentum``,
``--muon-nesterov``, ``--muon-num-ns-steps``, ``--muon-coefficient-type``, ``--muon-scale-mode``,
``--muon-no-split-qkv``, ``--muon-tp-mode``, ``--muon-extra-scale-factor``,
``--muon-scalar-optimizer``, ``--muon-fp32-matmul-prec``). :func:`add_muon_arguments` keeps
those flags (same meaning, honoured), replaces their defaults with Moonlight's where they differ
(logged once by :func:`muon_settings_from_args`), and adds the flags megatron-core lacks. On a
parser without them (megatron-core 0.16, or a custom script) it adds every flag itself.

megatron-core 0.19's own QK-Clip flags (``--qk-clip``, ``--qk-clip-threshold``,
``--qk-clip-alpha``) have the same meaning as ``--muon-qk-clip-threshold`` / ``--muon-qk-clip-alpha``
and are honoured: with ``--optimizer muon`` they are mapped onto ours (logged once), and
megatron-core's own clip (which would clip a second time, and needs Transformer Engine >= 2.9)
is turned off.

To add a flag: append a :class:`Flag` to :data:`FLAGS` and map it in :func:`muon_settings_from_args`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.newton_schulz import NS_COEFFICIENTS
from ..core.update import UPDATE_SCALES
from .config import LAYOUTS, MuonSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Flag:
    """One command-line flag: ``options`` (first is the main one), ``dest``, our ``default``,
    the remaining ``add_argument`` keywords, and ``setting``: the :class:`MuonSettings` field it
    sets (None: checked by :func:`muon_settings_from_args` itself)."""

    options: tuple[str, ...]
    dest: str
    default: Any
    kwargs: dict = field(default_factory=dict, hash=False)
    setting: Optional[str] = None


FLAGS: tuple[Flag, ...] = (
    Flag(("--muon-momentum",), "muon_momentum", 0.95,
         dict(type=float, help="Muon momentum mu (sum form buf = mu * buf + g). Moonlight: 0.95."), setting="momentum"),
    Flag(("--muon-nesterov",), "muon_nesterov", True,
         dict(action="store_true", help="Nesterov momentum: feed g + mu * buf to Newton-Schulz (default on)."), setting="nesterov"),
    Flag(("--muon-no-nesterov",), "muon_nesterov", True,
         dict(action="store_false", help="Plain momentum: feed buf to Newton-Schulz."), setting="nesterov"),
    Flag(("--muon-num-ns-steps",), "muon_num_ns_steps", 5,
         dict(type=int, help="Newton-Schulz iterations (Moonlight: 5)."), setting="ns_steps"),
    Flag(("--muon-coefficient-type",), "muon_coefficient_type", "moonlight",
         dict(type=str, help=f"Newton-Schulz coefficient set, one of {sorted(NS_COEFFICIENTS)} "
                             "(moonlight = (3.4445, -4.7750, 2.0315) every step)."), setting="ns_coefficients"),
    Flag(("--muon-ns-dtype",), "muon_ns_dtype", "bfloat16",
         dict(type=str, choices=["bfloat16", "float32"], help="Newton-Schulz compute dtype (Moonlight: bfloat16)."), setting="ns_dtype"),
    Flag(("--muon-scale-mode",), "muon_scale_mode", "moonlight",
         dict(type=str, choices=sorted(UPDATE_SCALES),
              help="Update scale: moonlight = 0.2 * sqrt(max(rows, cols)) (AdamW's lr and weight decay "
                   "carry over), keller = sqrt(max(1, rows/cols)), spectral = sqrt(rows/cols), none = 1."), setting="update_scale"),
    Flag(("--muon-extra-scale-factor",), "muon_extra_scale_factor", 1.0,
         dict(type=float, help="Extra factor on the Muon update; muon-megatron supports only 1.0."), setting="extra_scale_factor"),
    Flag(("--muon-no-split-qkv",), "muon_split_qkv", True,
         dict(action="store_false", help="Orthogonalise a fused QKV weight as one matrix instead of q, k, v."), setting="split_qkv"),
    Flag(("--muon-no-split-fc1",), "muon_split_fc1", True,
         dict(action="store_false", help="Orthogonalise a fused SwiGLU fc1 weight as one matrix instead of gate, up."), setting="split_fc1"),
    Flag(("--muon-adamw-params",), "muon_adamw_params", [],
         dict(nargs="+", type=str, metavar="PATTERN",
              help="fnmatch patterns of parameter names (e.g. '*.router.weight') updated by AdamW instead of Muon."), setting="adamw_params"),
    Flag(("--muon-params",), "muon_params", [],
         dict(nargs="+", type=str, metavar="PATTERN",
              help="fnmatch patterns of parameter names forced onto Muon (e.g. '*output_layer.weight')."), setting="muon_params"),
    Flag(("--muon-layout",), "muon_layout", "gather",
         dict(type=str, choices=list(LAYOUTS),
              help="How Muon pieces reach the rank that orthogonalises a matrix: gather = from Megatron's own "
                   "buffer layout; aligned = DDP buffers laid out so each matrix lies whole in one DP shard "
                   "(megatron-core >= 0.19, with --use-distributed-optimizer; no extra DP traffic, some padding)."), setting="layout"),
    Flag(("--muon-ns-backend",), "muon_ns_backend", "auto",
         dict(type=str, metavar="NAME",
              help="Newton-Schulz implementation: auto = on CUDA the fastest of muon_megatron.kernels' backends "
                   "(Triton one-triangle kernel, batched torch), timed once per matrix shape; torch = the batched "
                   "torch path; or a backend name (torch_batched, torch_baddbmm, torch_reference, "
                   "triton_symmetric)."), setting="ns_backend"),
    Flag(("--muon-pipeline-exchange",), "muon_pipeline_exchange", False,
         dict(action="store_true",
              help="Exchange Newton-Schulz pieces chunk by chunk, posted one chunk ahead, to overlap the exchange with "
                   "Newton-Schulz (for slow links; the default single exchange was faster on NVLink)."),
         setting="pipeline_exchange"),
    Flag(("--muon-log-update-rms",), "muon_log_update_rms", False,
         dict(action="store_true", help="Log the RMS of the update of each param group every step."), setting="log_update_rms"),
    Flag(("--muon-qk-clip-threshold",), "muon_qk_clip_threshold", None,
         dict(type=float, metavar="TAU",
              help="QK-Clip (Kimi K2's MuonClip): after each optimizer step, scale the query and key weights of every "
                   "attention head whose largest pre-softmax logit in the step exceeded TAU so that it would have been "
                   "TAU (Kimi K2: 100). Default: off, as in Moonlight. megatron-core's --qk-clip / "
                   "--qk-clip-threshold / --qk-clip-alpha mean the same and are mapped onto these flags."),
         setting="qk_clip_threshold"),
    Flag(("--muon-qk-clip-alpha",), "muon_qk_clip_alpha", 0.5,
         dict(type=float, metavar="ALPHA",
              help="QK-Clip's split between query and key: queries scale by gamma**ALPHA, keys by gamma**(1-ALPHA) "
                   "(0.5: sqrt(gamma) each)."),
         setting="qk_clip_alpha"),
    Flag(("--muon-qk-clip-gqa-rule",), "muon_qk_clip_gqa_rule", "per_head",
         dict(type=str, choices=["per_head", "group"],
              help="QK-Clip with grouped-query attention, where query heads share a key head: per_head = every "
                   "clipped head lands on TAU and the others keep their logits; group = megatron-core's rule, the "
                   "group's largest head lands on TAU and the others of the group are scaled with it."),
         setting="qk_clip_gqa_rule"),
    Flag(("--muon-tp-mode",), "muon_tp_mode", "distributed",
         dict(type=str, choices=["blockwise", "duplicated", "distributed"],
              help="muon-megatron always orthogonalises full matrices (megatron-core's 'distributed' / "
                   "'duplicated' result); 'blockwise' is refused.")),
    Flag(("--muon-scalar-optimizer",), "muon_scalar_optimizer", "adam",
         dict(type=str, choices=["adam"], help="Optimizer of non-matrix parameters: AdamW (Moonlight).")),
)

# megatron-core defaults replaced by Moonlight's, logged once.
_NOTES: list[str] = []
_LOGGED = False


def add_muon_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--muon-*`` flags to ``parser`` (idempotent) and return it."""
    existing = parser._option_string_actions  # argparse keeps no public map of option strings
    if "--muon-ns-dtype" in existing and getattr(parser, "_muon_megatron_flags", False):
        return parser
    group = parser.add_argument_group("muon-megatron", "Moonlight's Muon (muon-megatron); --optimizer muon")
    for flag in FLAGS:
        action = existing.get(flag.options[0])
        if action is None:
            group.add_argument(*flag.options, dest=flag.dest, default=flag.default, **flag.kwargs)
            continue
        if action.dest != flag.dest:
            raise RuntimeError(
                f"{flag.options[0]} is already defined with dest {action.dest!r}; muon-megatron expected "
                f"{flag.dest!r}. This megatron-core release is not supported"
            )
        choices = flag.kwargs.get("choices")
        if choices and action.choices is not None:
            action.choices = list(dict.fromkeys([*action.choices, *choices]))
        if action.default != flag.default:
            note = (
                f"{flag.options[0]}: megatron-core's default is {action.default!r}, muon-megatron uses "
                f"{flag.default!r} (Moonlight); pass the flag to choose"
            )
            if note not in _NOTES:
                _NOTES.append(note)
            parser.set_defaults(**{flag.dest: flag.default})
    parser._muon_megatron_flags = True
    return parser


def muon_settings_from_args(args: argparse.Namespace) -> MuonSettings:
    """:class:`MuonSettings` from parsed flags; ValueError naming the flag for a bad value.
    Logs once which megatron-core defaults were replaced by Moonlight's."""
    global _LOGGED
    tp_mode = getattr(args, "muon_tp_mode", "distributed")
    if tp_mode == "blockwise":
        raise ValueError(
            "--muon-tp-mode blockwise orthogonalises each tensor-parallel shard alone, which is not Muon's "
            "update; muon-megatron always orthogonalises full matrices: drop the flag or pass 'distributed'"
        )
    scalar = getattr(args, "muon_scalar_optimizer", "adam")
    if scalar != "adam":
        raise ValueError(f"--muon-scalar-optimizer {scalar!r}: muon-megatron uses AdamW (pass 'adam')")
    values = {}
    for flag in FLAGS:
        if flag.setting is not None:
            value = getattr(args, flag.dest, flag.default)
            values[flag.setting] = tuple(value or ()) if isinstance(flag.default, list) else value
    mapped = _megatron_qk_clip(args, values)
    settings = MuonSettings(**values)
    if not _LOGGED:
        _LOGGED = True
        for note in _NOTES:
            logger.info("muon-megatron: %s", note)
        if mapped:
            logger.info("muon-megatron: %s", mapped)
        if settings.qk_clip_threshold is not None:
            logger.info("muon-megatron: QK-Clip on: tau %s, alpha %s, GQA rule %r", settings.qk_clip_threshold,
                        settings.qk_clip_alpha, settings.qk_clip_gqa_rule)
        prec = getattr(args, "muon_fp32_matmul_prec", None)
        if prec not in (None, "medium"):
            logger.info("muon-megatron: --muon-fp32-matmul-prec %s is not used; choose --muon-ns-dtype", prec)
        logger.info("muon-megatron settings: %s", settings)
    return settings


def _megatron_qk_clip(args: argparse.Namespace, values: dict) -> Optional[str]:
    """Map megatron-core's own QK-Clip flags (0.19: ``--qk-clip``, ``--qk-clip-threshold``,
    ``--qk-clip-alpha``; same rule, same alpha convention) onto ours in ``values``; they count only
    with ``--qk-clip``, as in megatron-core. ValueError when both spellings are given different
    values. Returns a note saying what was mapped, or None."""
    if not getattr(args, "qk_clip", False):
        return None
    tau = getattr(args, "qk_clip_threshold", 100.0)
    alpha = getattr(args, "qk_clip_alpha", 0.5)
    ours_tau, ours_alpha = values["qk_clip_threshold"], values["qk_clip_alpha"]
    if ours_tau is not None and ours_tau != tau:
        raise ValueError(f"--qk-clip-threshold {tau} (megatron-core's flag, default 100) and --muon-qk-clip-threshold "
                         f"{ours_tau} disagree: pass one of them")
    if ours_alpha != 0.5 and alpha != 0.5 and ours_alpha != alpha:
        raise ValueError(f"--qk-clip-alpha {alpha} and --muon-qk-clip-alpha {ours_alpha} disagree: pass one of them")
    values["qk_clip_threshold"] = tau
    values["qk_clip_alpha"] = alpha if alpha != 0.5 else ours_alpha
    return (f"--qk-clip: muon-megatron clips after its Muon step with tau {tau} and alpha {values['qk_clip_alpha']} "
            f"(as --muon-qk-clip-threshold / --muon-qk-clip-alpha; GQA rule {values['qk_clip_gqa_rule']!r}, "
            "--muon-qk-clip-gqa-rule group is megatron-core's); megatron-core's own clip_qk does not run")


def apply_megatron_qk_clip_(args: argparse.Namespace) -> None:
    """After :func:`muon_settings_from_args` accepted them: write megatron-core's QK-Clip flags into
    ours and turn ``args.qk_clip`` off, so that megatron-core neither clips a second time nor
    requires Transformer Engine for it (``install()`` calls this for ``--optimizer muon``)."""
    values = {"qk_clip_threshold": getattr(args, "muon_qk_clip_threshold", None),
              "qk_clip_alpha": getattr(args, "muon_qk_clip_alpha", 0.5),
              "qk_clip_gqa_rule": getattr(args, "muon_qk_clip_gqa_rule", "per_head")}
    if _megatron_qk_clip(args, values) is not None:
        args.muon_qk_clip_threshold = values["qk_clip_threshold"]
        args.muon_qk_clip_alpha = values["qk_clip_alpha"]
        args.qk_clip = False


def default_notes() -> tuple[str, ...]:
    """The megatron-core defaults replaced so far (for tests and messages)."""
    return tuple(_NOTES)
