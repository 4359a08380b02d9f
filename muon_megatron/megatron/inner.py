"""``MegatronMuon``: the distributed Muon engine as the inner optimizer of Megatron's wrappers.

Adds to :class:`muon_megatron.distributed.DistributedMuon` what Megatron needs: checkpoints that
carry hyper-parameters but never layouts (a run with another DP or TP size loads them and keeps
its own), a clear :class:`OptimizerStateMismatch` for another optimizer's state, and per-step
telemetry (wall time of the step, update RMS, QK-Clip's max logits and clipped heads) handed to
``step_hooks`` (``install()`` registers one that writes to Megatron's TensorBoard writer), and
QK-Clip after the step when the factory sets ``qk_clip``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from ..distributed import DistributedMuon
from .state import STRUCTURAL_KEYS, OptimizerStateMismatch, check_muon_groups, check_muon_state

__all__ = ["MegatronMuon", "OptimizerStateMismatch", "tensorboard_hook"]

logger = logging.getLogger(__name__)


class MegatronMuon(DistributedMuon):
    """``DistributedMuon`` as Megatron's inner optimizer (see the module docstring).

    ``last_step_seconds``: wall time of the last ``step`` (momentum, exchange, Newton-Schulz and
    apply, including the time spent waiting in collectives, and QK-Clip). ``step_hooks``:
    callables receiving the optimizer after each step.

    ``qk_clip``: a :class:`.qk_clip.MegatronQKClip` (set by the factory when QK-Clip is on), applied
    to the main parameters right after each taken Muon step (before the wrapper copies them to the
    model); a skipped step (non-finite gradients) discards the step's max logits instead.
    ``last_qk_clip``: that step's :class:`~muon_megatron.core.qk_clip.QKClipStats`, or None."""

    KEPT_KEYS = tuple(k for k in STRUCTURAL_KEYS if k not in DistributedMuon.RUN_KEYS)

    def __init__(self, *args, **kwargs):
        self.step_hooks: list[Callable[["MegatronMuon"], None]] = []
        self.last_step_seconds = 0.0
        self.qk_clip = None
        self.last_qk_clip = None
        super().__init__(*args, **kwargs)

    def step(self, closure=None):
        start = time.perf_counter()
        skipped = self.skipped_steps
        loss = super().step(closure)
        self.last_qk_clip = None
        if self.qk_clip is not None:
            if self.skipped_steps == skipped:
                self.last_qk_clip = self.qk_clip.apply_()
            else:
                self.qk_clip.discard()
        self.last_step_seconds = time.perf_counter() - start
        for hook in self.step_hooks:
            hook(self)
        return loss

    def load_state_dict(self, state_dict):
        """As ``DistributedMuon``'s, after checking that the state is Muon's (else
        :class:`OptimizerStateMismatch` naming ``--no-load-optim``)."""
        check_muon_groups(state_dict["param_groups"], self.param_groups)
        check_muon_state(state_dict.get("state", {}))
        super().load_state_dict(state_dict)


def tensorboard_hook(writer_fn: Callable, iteration_fn: Callable, prefix: str = "muon") -> Callable:
    """A step hook writing ``<prefix>/optimizer-step-seconds``, ``<prefix>/newton-schulz-seconds``
    (this rank's) and, when the optimizer reports it, ``<prefix>/update-rms/<muon|adamw>-group<i>``
    to ``writer_fn()`` (a TensorBoard ``SummaryWriter`` or None) at step ``iteration_fn()``. Also
    logs them at DEBUG. With QK-Clip on, also ``<prefix>/qk-clip/max-logit`` and
    ``<prefix>/qk-clip/clipped-heads`` (over this pipeline stage's layers) and per layer
    ``<prefix>/qk-clip/max-logit/<layer>`` and ``<prefix>/qk-clip/clipped-heads/<layer>``: the
    largest max logit of the layer's heads measured in the step (before clipping) and how many of
    its heads were clipped."""

    def hook(opt: MegatronMuon) -> None:
        writer = writer_fn()
        step = iteration_fn()
        ns_seconds = opt.exchange.ns_seconds
        logger.debug("muon step %s: %.3f ms (Newton-Schulz %.3f ms), update RMS %s", step,
                     1e3 * opt.last_step_seconds, 1e3 * ns_seconds, opt.last_update_rms)
        if getattr(opt, "last_qk_clip", None) is not None:
            stats = opt.last_qk_clip
            logger.debug("muon step %s QK-Clip (tau %s): max logit %.4g, %d heads clipped; per layer %s / %s", step,
                         stats.tau, stats.max_logit_overall, stats.clipped_heads_total, stats.max_logit,
                         stats.clipped_heads)
        if writer is None:
            return
        writer.add_scalar(f"{prefix}/optimizer-step-seconds", opt.last_step_seconds, step)
        writer.add_scalar(f"{prefix}/newton-schulz-seconds", ns_seconds, step)
        for index, rms in opt.last_update_rms.items():
            kind = "muon" if opt.param_groups[index]["use_muon"] else "adamw"
            writer.add_scalar(f"{prefix}/update-rms/{kind}-group{index}", rms, step)
        stats = getattr(opt, "last_qk_clip", None)
        if stats is not None:
            writer.add_scalar(f"{prefix}/qk-clip/max-logit", stats.max_logit_overall, step)
            writer.add_scalar(f"{prefix}/qk-clip/clipped-heads", stats.clipped_heads_total, step)
            for layer, value in stats.max_logit.items():
                writer.add_scalar(f"{prefix}/qk-clip/max-logit/{layer}", value, step)
                writer.add_scalar(f"{prefix}/qk-clip/clipped-heads/{layer}", stats.clipped_heads[layer], step)

    return hook
