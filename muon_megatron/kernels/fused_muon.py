"""``FusedMuon``: :class:`muon_megatron.Muon` with the fast step of :class:`.step.MuonStepRuntime`.

Muon groups whose parameters are plain matrices (2-D, ``Whole`` split) or plain expert stacks
(3-D ``[E, m, n]``, ``ExpertStack`` without ``inner``) run through one runtime per group: batched,
backend-selected Newton-Schulz and fused element-wise work, no per-parameter Python loop. Other
Muon groups (fused QKV, gate|up splits), AdamW groups, non-finite handling, ``state_dict`` and
update-RMS reporting are :class:`~muon_megatron.Muon`'s. The momentum lives in the optimizer state
(``momentum_buffer``, aliased by the runtime), so checkpoints are interchangeable with ``Muon``'s.

Promise: the update of ``Muon`` within ``ns_dtype`` rounding (not bitwise).
"""

from __future__ import annotations

from typing import Optional, Union


from ..core.optimizer import Muon
from ..core.splits import ExpertStack, Whole
from .select import BackendChooser
from .step import MuonStepRuntime


def _fusable(group: dict) -> bool:
    split = group.get("split")
    for p in group["params"]:
        if p.ndim == 2 and split in (None, Whole()):
            continue
        if p.ndim == 3 and (split is None or (isinstance(split, ExpertStack) and split.inner is None
                                               and split.layout == "stacked" and split.expert_shape is None)):
            continue
        return False
    return bool(group["params"])


class FusedMuon(Muon):
    """``Muon`` (same arguments) plus ``backend`` and ``elementwise`` of :class:`MuonStepRuntime`."""

    def __init__(self, params, *args, backend: Union[str, BackendChooser, None] = None, elementwise: str = "auto",
                 **kwargs):
        self._backend, self._elementwise = backend, elementwise
        self._runtimes: dict[int, Optional[MuonStepRuntime]] = {}
        super().__init__(params, *args, **kwargs)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._runtimes.clear()  # the loaded momentum tensors replace the aliased ones: rebuild

    def _runtime(self, index: int, group: dict) -> Optional[MuonStepRuntime]:
        if index not in self._runtimes:
            runtime = None
            if _fusable(group) and not self.report_update_rms:
                runtime = MuonStepRuntime(
                    group["params"], momentum=group["momentum"], nesterov=group["nesterov"],
                    ns_steps=group["ns_steps"], ns_coefficients=group["ns_coefficients"], ns_dtype=group["ns_dtype"],
                    update_scale=group["update_scale"], backend=self._backend, elementwise=self._elementwise,
                    max_batch=self.max_batch,
                )
                for p, buf in zip(group["params"], runtime.buffers):
                    old = self.state[p].get("momentum_buffer")
                    if old is not None:
                        buf.copy_(old)
                    self.state[p]["momentum_buffer"] = buf
            self._runtimes[index] = runtime
        return self._runtimes[index]

    def _muon_group(self, index: int, group: dict, sums: dict[int, list]) -> None:
        runtime = self._runtime(index, group) if all(p.grad is not None for p in group["params"]) else None
        if runtime is None:
            return super()._muon_group(index, group, sums)
        runtime.step_([p.grad for p in group["params"]], lr=group["lr"], weight_decay=group["weight_decay"])
