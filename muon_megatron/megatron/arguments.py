"""The ``--muon-*`` flags: added to any argparse parser, reconciled with megatron-core's own.

megatron-core 0.19 already defines some Muon flags for its own Muon (``--muon-momentum``,
``--muon-nesterov``, ``--muon-num-ns-steps``, ``--muon-coefficient-type``, ``--muon-scale-mode``,
``--muon-no-split-qkv``, ``--muon-tp-mode``, ``--muon-extra-scale-factor``,
``--muon-scalar-optimizer``, ``--muon-fp32-matmul-prec``). :func:`add_muon_arguments` keeps
those flags (same meaning, honoured), replaces their defaults with Moonlight's where they differ
(logged once by :func:`muon_settings_from_args`), and adds the flags megatron-core lacks. On a
parser without them (megatron-core 0.16, or a custom script) it adds every flag itself.

To add a flag: append a :class:`Flag` to :data:`FLAGS` and map it in :func:`muon_settings_from_args`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any

from ..core.newton_schulz import NS_COEFFICIENTS
from ..core.update import UPDATE_SCALES
from .config import LAYOUTS, MuonSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Flag:
    """One command-line flag: ``options`` (first is the main one), ``dest``, our ``default``,
    and the remaining ``add_argument`` keywords."""

    options: tuple[str, ...]
    dest: str
    default: Any
    kwargs: dict = field(default_factory=dict, hash=False)


FLAGS: tuple[Flag, ...] = (
    Flag(("--muon-momentum",), "muon_momentum", 0.95,
         dict(type=float, help="Muon momentum mu (sum form buf = mu * buf + g). Moonlight: 0.95.")),
    Flag(("--muon-nesterov",), "muon_nesterov", True,
         dict(action="store_true", help="Nesterov momentum: feed g + mu * buf to Newton-Schulz (default on).")),
    Flag(("--muon-no-nesterov",), "muon_nesterov", True,
         dict(action="store_false", help="Plain momentum: feed buf to Newton-Schulz.")),
    Flag(("--muon-num-ns-steps",), "muon_num_ns_steps", 5,
         dict(type=int, help="Newton-Schulz iterations (Moonlight: 5).")),
    Flag(("--muon-coefficient-type",), "muon_coefficient_type", "moonlight",
         dict(type=str, help=f"Newton-Schulz coefficient set, one of {sorted(NS_COEFFICIENTS)} "
                             "(moonlight = (3.4445, -4.7750, 2.0315) every step).")),
    Flag(("--muon-ns-dtype",), "muon_ns_dtype", "bfloat16",
         dict(type=str, choices=["bfloat16", "float32"], help="Newton-Schulz compute dtype (Moonlight: bfloat16).")),
    Flag(("--muon-scale-mode",), "muon_scale_mode", "moonlight",
         dict(type=str, choices=sorted(UPDATE_SCALES),
              help="Update scale: moonlight = 0.2 * sqrt(max(rows, cols)) (AdamW's lr and weight decay "
                   "carry over), keller = sqrt(max(1, rows/cols)), spectral = sqrt(rows/cols), none = 1.")),
    Flag(("--muon-extra-scale-factor",), "muon_extra_scale_factor", 1.0,
         dict(type=float, help="Extra factor on the Muon update; muon-megatron supports only 1.0.")),
    Flag(("--muon-no-split-qkv",), "muon_split_qkv", True,
         dict(action="store_false", help="Orthogonalise a fused QKV weight as one matrix instead of q, k, v.")),
    Flag(("--muon-no-split-fc1",), "muon_split_fc1", True,
         dict(action="store_false", help="Orthogonalise a fused SwiGLU fc1 weight as one matrix instead of gate, up.")),
    Flag(("--muon-adamw-params",), "muon_adamw_params", [],
         dict(nargs="+", type=str, metavar="PATTERN",
              help="fnmatch patterns of parameter names (e.g. '*.router.weight') updated by AdamW instead of Muon.")),
    Flag(("--muon-params",), "muon_params", [],
         dict(nargs="+", type=str, metavar="PATTERN",
              help="fnmatch patterns of parameter names forced onto Muon (e.g. '*output_layer.weight').")),
    Flag(("--muon-layout",), "muon_layout", "gather",
         dict(type=str, choices=list(LAYOUTS),
              help="How Muon pieces reach the rank that orthogonalises a matrix: gather = from Megatron's own "
                   "buffer layout; aligned = DDP buffers laid out so each matrix lies whole in one DP shard "
                   "(megatron-core >= 0.19, with --use-distributed-optimizer; no extra DP traffic, some padding).")),
    Flag(("--muon-ns-backend",), "muon_ns_backend", "auto",
         dict(type=str, metavar="NAME",
              help="Newton-Schulz implementation: auto = on CUDA the fastest of muon_megatron.kernels' backends "
                   "(Triton one-triangle kernel, batched torch), timed once per matrix shape; torch = the batched "
                   "torch path; or a backend name (torch_batched, torch_baddbmm, torch_reference, "
                   "triton_symmetric).")),
    Flag(("--muon-log-update-rms",), "muon_log_update_rms", False,
         dict(action="store_true", help="Log the RMS of the update of each param group every step.")),
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
    settings = MuonSettings(
        momentum=args.muon_momentum,
        nesterov=args.muon_nesterov,
        ns_steps=args.muon_num_ns_steps,
        ns_coefficients=args.muon_coefficient_type,
        ns_dtype=args.muon_ns_dtype,
        update_scale=args.muon_scale_mode,
        extra_scale_factor=args.muon_extra_scale_factor,
        split_qkv=args.muon_split_qkv,
        split_fc1=args.muon_split_fc1,
        adamw_params=tuple(args.muon_adamw_params or ()),
        muon_params=tuple(args.muon_params or ()),
        layout=args.muon_layout,
        log_update_rms=args.muon_log_update_rms,
        ns_backend=getattr(args, "muon_ns_backend", "auto"),
    )
    if not _LOGGED:
        _LOGGED = True
        for note in _NOTES:
            logger.info("muon-megatron: %s", note)
        prec = getattr(args, "muon_fp32_matmul_prec", None)
        if prec not in (None, "medium"):
            logger.info("muon-megatron: --muon-fp32-matmul-prec %s is not used; choose --muon-ns-dtype", prec)
        logger.info("muon-megatron settings: %s", settings)
    return settings


def default_notes() -> tuple[str, ...]:
    """The megatron-core defaults replaced so far (for tests and messages)."""
    return tuple(_NOTES)
