"""``MegatronMuon``: the distributed Muon engine as the inner optimizer of Megatron's wrappers.

Adds to :class:`muon_megatron.distributed.DistributedMuon` what Megatron needs: checkpoints that
carry hyper-parameters but never layouts (a run with another DP or TP size loads them and keeps
its own), a clear :class:`OptimizerStateMismatch` for another optimizer's state, and per-step
telemetry (wall time of the step, update RMS) handed to ``step_hooks`` (``install()`` registers
one that writes to Megatron's TensorBoard writer).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from ..distributed import DistributedMuon

logger = logging.getLogger(__name__)

STRUCTURAL_KEYS = ("layouts", "names", "use_muon", "split", "optimizer", "is_expert_parallel")
MUON_STATE_KEYS = ("momentum_buffer",)
ADAMW_STATE_KEYS = ("exp_avg", "exp_avg_sq")


class OptimizerStateMismatch(ValueError):
    """The checkpoint's optimizer state is not Muon's (e.g. an AdamW run's)."""


def mismatch(what: str) -> OptimizerStateMismatch:
    return OptimizerStateMismatch(
        f"the checkpoint's optimizer state is not muon-megatron's Muon state ({what}). To start Muon from "
        "another optimizer's checkpoint (or the reverse), load the weights only: pass --no-load-optim "
        "(and --no-load-rng if the run layout changed), or finetune with --finetune"
    )


class MegatronMuon(DistributedMuon):
    """``DistributedMuon`` as Megatron's inner optimizer (see the module docstring).

    ``last_step_seconds``: wall time of the last ``step`` (momentum, exchange, Newton-Schulz and
    apply, including the time spent waiting in collectives). ``step_hooks``: callables receiving
    the optimizer after each step."""

    def __init__(self, *args, **kwargs):
        self.step_hooks: list[Callable[["MegatronMuon"], None]] = []
        self.last_step_seconds = 0.0
        super().__init__(*args, **kwargs)

    def step(self, closure=None):
        start = time.perf_counter()
        loss = super().step(closure)
        self.last_step_seconds = time.perf_counter() - start
        for hook in self.step_hooks:
            hook(self)
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["param_groups"] = [{k: v for k, v in g.items() if k not in ("layouts", "names")} for g in sd["param_groups"]]
        return sd

    def load_state_dict(self, state_dict):
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            "use_muon" not in g or bool(g["use_muon"]) != bool(c["use_muon"]) for g, c in zip(saved, self.param_groups)
        ):
            raise mismatch(f"{len(saved)} param groups without muon-megatron's use_muon markers")
        for state in state_dict.get("state", {}).values():
            keys = set(state)
            if not (keys & set(MUON_STATE_KEYS) or keys & set(ADAMW_STATE_KEYS)):
                raise mismatch(f"state keys {sorted(keys)}")
        keep = [{k: g[k] for k in STRUCTURAL_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, structural in zip(self.param_groups, keep):
            group.update(structural)


def tensorboard_hook(writer_fn: Callable, iteration_fn: Callable, prefix: str = "muon") -> Callable:
    """A step hook writing ``<prefix>/optimizer-step-seconds``, ``<prefix>/newton-schulz-seconds``
    (this rank's) and, when the optimizer reports it, ``<prefix>/update-rms/<muon|adamw>-group<i>``
    to ``writer_fn()`` (a TensorBoard ``SummaryWriter`` or None) at step ``iteration_fn()``. Also
    logs them at DEBUG."""

    def hook(opt: MegatronMuon) -> None:
        writer = writer_fn()
        step = iteration_fn()
        ns_seconds = opt.exchange.ns_seconds
        logger.debug("muon step %s: %.3f ms (Newton-Schulz %.3f ms), update RMS %s", step,
                     1e3 * opt.last_step_seconds, 1e3 * ns_seconds, opt.last_update_rms)
        if writer is None:
            return
        writer.add_scalar(f"{prefix}/optimizer-step-seconds", opt.last_step_seconds, step)
        writer.add_scalar(f"{prefix}/newton-schulz-seconds", ns_seconds, step)
        for index, rms in opt.last_update_rms.items():
            kind = "muon" if opt.param_groups[index]["use_muon"] else "adamw"
            writer.add_scalar(f"{prefix}/update-rms/{kind}-group{index}", rms, step)

    return hook
