"""``DeepSpeedMuon``: the client optimizer DeepSpeed wraps when ``"type": "muon"`` selects ours.

DeepSpeed builds its wrapper (the ZeRO-1/2 optimizer, the fp16/bf16 optimizer of ZeRO-0, or none)
around this object and replaces the tensors of its param groups with its own (flat fp32 ZeRO
partitions, or fp32 master copies). :meth:`DeepSpeedMuon.bind` is then told, by
:mod:`.translate`, which pieces of which parameters each of those tensors holds, and builds one
:class:`muon_megatron.distributed.DistributedMuon` per param group over the group's process group.

The wrapper calls :meth:`step` with the gradients already reduced over data parallelism, averaged
over gradient accumulation, unscaled (fp16) and clipped, and only when no rank overflowed; ZeRO-1/2
call it once per param group (with ``param_groups`` narrowed to that group), ZeRO-0 once for all.
Each call runs that group's distributed step: momentum on the local pieces, every matrix
orthogonalised once by one owner rank, the update applied locally. DeepSpeed then copies the
fp32 partition to the model weights and all-gathers them as it always does.

``param_groups`` stay the public ones (learning-rate schedulers edit them); each step copies their
hyper-parameters into the private groups of the inner optimizers. State lives in one dict shared
with the inner optimizers and is saved with a ``"muon_megatron"`` marker, so a checkpoint written
by another optimizer is refused with a message instead of being misread.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..core.optimizer import finite_flags, resolve_dtype
from ..distributed import DistributedMuon, ParamLayout
from ..distributed.comm import any_rank
from ..kernels.orthogonalize import orthogonalizer
from .config import MuonConfig

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
_NS_KEYS = ("ns_steps", "ns_coefficients", "ns_dtype")
# Group keys that describe structure, not hyper-parameters: never copied from a checkpoint.
_STRUCTURAL_KEYS = {"params", "names", "split", "use_muon", "layouts", "moe", "name", *_NS_KEYS}


class ForeignOptimizerStateError(ValueError):
    """The optimizer state being loaded was not written by :class:`DeepSpeedMuon`, or was written
    for other param groups."""


@dataclass(frozen=True)
class GroupPieces:
    """What one param group's tensors hold on this rank, in the distributed engine's terms.

    tensors: the group's local tensors (as the DeepSpeed wrapper put them into ``params``).
    layouts: per tensor, a list of ``(ParamLayout, flat offset in the tensor)``; None for AdamW.
    process_group: the ranks that hold pieces of this group's matrices (ZeRO: its DP group).
    """

    tensors: tuple
    layouts: Optional[tuple]
    process_group: object


def describe_foreign_state(state_dict) -> str:
    """A short guess at what wrote ``state_dict`` (for error messages)."""
    if not isinstance(state_dict, dict):
        return f"a {type(state_dict).__name__}"
    keys = set()
    for entry in (state_dict.get("state") or {}).values():
        if isinstance(entry, dict):
            keys.update(entry)
    groups = state_dict.get("param_groups") or []
    if any(isinstance(g, dict) and "use_muon" in g for g in groups):
        return "DeepSpeed's built-in Muon (MuonWithAuxAdam)"
    if "exp_avg" in keys or "exp_avg_sq" in keys:
        return "an Adam/AdamW optimizer (exp_avg, exp_avg_sq)"
    if keys:
        return f"an optimizer with state keys {sorted(keys)}"
    return "an optimizer without state"


class DeepSpeedMuon(torch.optim.Optimizer):
    """Moonlight's Muon (AdamW for the other parameters) as a DeepSpeed client optimizer.

    Args:
        param_groups: groups as :func:`muon_megatron.muon_param_groups` builds them: ``params``,
            ``names`` (one per parameter), ``use_muon``, ``split`` (Muon groups). May carry
            DeepSpeed's MoE keys ``moe`` and ``name``.
        config: the :class:`MuonConfig` read from ``optimizer.params``.

    Not usable until :meth:`bind` (``muon_megatron.deepspeed.initialize`` does it).
    Promise: after each step the weights equal, within float rounding, what
    :class:`muon_megatron.Muon` computes in one process from the same (reduced, clipped) gradient;
    each matrix is orthogonalised once per optimizer step across the data-parallel group.
    """

    def __init__(self, param_groups: Sequence[dict], config: MuonConfig):
        groups = [dict(g) for g in param_groups]
        for i, g in enumerate(groups):
            if "names" not in g or len(g["names"]) != len(g["params"]):
                raise ValueError(f"DeepSpeedMuon: param group {i} needs 'names', one per parameter")
        self.config = config
        self._names = [list(g["names"]) for g in groups]
        self._originals = [list(g["params"]) for g in groups]
        defaults = dict(config.optimizer_kwargs(), use_muon=True)
        super().__init__(groups, defaults)
        self._inner: list[Optional[DistributedMuon]] = [None] * len(self.param_groups)
        self._index: dict[int, int] = {}
        self._orthogonalize = orthogonalizer(config.ns_backend)  # one, so shapes are timed once
        self.bound_to: Optional[str] = None

    # -- binding ---------------------------------------------------------------------------------

    def original_params(self, group_index: int) -> list[torch.nn.Parameter]:
        """The model parameters of group ``group_index`` as given at construction, in order."""
        return list(self._originals[group_index])

    def names(self, group_index: int) -> list[str]:
        return list(self._names[group_index])

    def bind(self, pieces: Sequence[GroupPieces], wrapper: str) -> None:
        """Build the per-group distributed optimizers from the wrapper's tensors.

        Collective over each group's process group: every rank must call it, in the same order.
        ``wrapper`` names the DeepSpeed wrapper, for messages.
        """
        if len(pieces) != len(self.param_groups):
            raise ValueError(f"bind: {len(pieces)} group descriptions for {len(self.param_groups)} param groups")
        for i, (group, desc) in enumerate(zip(self.param_groups, pieces)):
            if [id(t) for t in group["params"]] != [id(t) for t in desc.tensors]:
                raise ValueError(
                    f"bind: param group {i} holds other tensors than the description; {wrapper} changed the "
                    "optimizer's groups in a way muon_megatron does not understand"
                )
            private = {k: v for k, v in group.items() if k not in ("names", "split", "moe", "name")}
            private["params"] = list(desc.tensors)
            if group["use_muon"]:
                private["layouts"] = [list(entry) for entry in desc.layouts]
            inner = DistributedMuon([private], **self.config.optimizer_kwargs(), process_group=desc.process_group,
                                    orthogonalize=self._orthogonalize)
            inner.state = self.state
            self._inner[i] = inner
            self._index[id(group)] = i
            if group["use_muon"]:
                logger.info("muon_megatron: group %d under %s: %s", i, wrapper, inner.plan.summary().replace("\n", "; "))
        self.bound_to = wrapper

    # -- the step --------------------------------------------------------------------------------

    def _sync(self, group: dict, inner: DistributedMuon) -> None:
        private = inner.param_groups[0]
        if isinstance(group.get("ns_dtype"), str):  # a loaded checkpoint stores the dtype by name
            group["ns_dtype"] = resolve_dtype(group["ns_dtype"])
        for key in _NS_KEYS:
            if key in group and group[key] != private[key]:
                raise ValueError(
                    f"{key} of a Muon param group changed after initialize ({private[key]!r} -> {group[key]!r}); "
                    "the Newton-Schulz plan is fixed: set it in optimizer.params before initialize"
                )
        for key, value in group.items():
            if key not in _STRUCTURAL_KEYS:
                private[key] = value

    def _all_finite(self, groups: Sequence[dict]) -> bool:
        flags = finite_flags([p.grad for g in groups for p in g["params"] if p.grad is not None])
        return not any_rank(not all(flags))

    @torch.no_grad()
    def step(self, closure=None):
        """Step the param groups currently in ``param_groups`` (ZeRO narrows it to one)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.bound_to is None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads and all(not bool(g.any()) for g in grads):
                # DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 with fp16/bf16) calls step() once with zero
                # gradients while it is constructed, to create optimizer state. Ours is created on the
                # first real step, so that call changes nothing (DeepSpeed's own optimizers would
                # apply a weight-decay step here; the single-process reference does not).
                logger.info("DeepSpeedMuon: state-initialisation step() with zero gradients before bind ignored")
                return loss
            raise RuntimeError(
                "DeepSpeedMuon.step() before bind(): create the engine with muon_megatron.deepspeed.initialize "
                "(or call muon_megatron.deepspeed.install() before deepspeed.initialize)"
            )
        groups = list(self.param_groups)
        if len(groups) > 1 and not self._all_finite(groups):
            # ZeRO-0 steps all groups at once; keep them in lockstep (ZeRO-1/2 check overflow before us).
            warnings.warn("DeepSpeedMuon: non-finite gradient; step skipped for every group", RuntimeWarning)
            return loss
        for group in groups:
            try:
                i = self._index[id(group)]
            except KeyError:
                raise RuntimeError(
                    f"DeepSpeedMuon.step(): a param group unknown at bind time (lr={group.get('lr')}); param "
                    "groups cannot be added or replaced after initialize"
                ) from None
            inner = self._inner[i]
            self._sync(group, inner)
            inner.step()
        return loss

    def inner_optimizers(self) -> list[DistributedMuon]:
        """The per-group distributed optimizers (after :meth:`bind`)."""
        return list(self._inner)

    # -- checkpoints -----------------------------------------------------------------------------

    def _signature(self) -> list[dict]:
        return [
            {"use_muon": bool(g["use_muon"]), "names": list(self._names[i]), "numel": [int(p.numel()) for p in g["params"]]}
            for i, g in enumerate(self.param_groups)
        ]

    def state_dict(self) -> dict:
        """Per-group state packed by tensor index, hyper-parameters, and a ``"muon_megatron"``
        marker with the groups' parameter names (checked on load). Plain tensors and Python values
        only, so ``torch.load(weights_only=True)`` reads it."""
        state, groups, index = {}, [], 0
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                if p in self.state and self.state[p]:
                    state[index] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.state[p].items()}
                ids.append(index)
                index += 1
            saved = {k: v for k, v in g.items() if k not in ("params", "split", "names", "ns_dtype")}
            saved["ns_dtype"] = str(g["ns_dtype"]).replace("torch.", "")
            saved["params"] = ids
            groups.append(saved)
        return {"state": state, "param_groups": groups,
                "muon_megatron": {"format": STATE_FORMAT, "groups": self._signature()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` wrote for the same groups (same parameters, same
        data-parallel layout). Anything else raises :class:`ForeignOptimizerStateError` saying
        how to start from the weights alone."""
        self.check_state_dict(state_dict)
        saved_state = state_dict["state"]
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            for key, value in saved.items():
                if key not in _STRUCTURAL_KEYS:
                    g[key] = value
            for p, index in zip(g["params"], saved["params"]):
                entry = saved_state.get(index, saved_state.get(str(index)))
                self.state.pop(p, None)
                if entry:
                    self.state[p] = {
                        k: (v.to(device=p.device, dtype=p.dtype if v.is_floating_point() and v.dim() else v.dtype)
                            if torch.is_tensor(v) else v)
                        for k, v in entry.items()
                    }

    def check_state_dict(self, state_dict) -> None:
        """Raise :class:`ForeignOptimizerStateError` unless ``state_dict`` was written by
        :meth:`state_dict` for these param groups at this layout."""
        marker = state_dict.get("muon_megatron") if isinstance(state_dict, dict) else None
        if marker is None:
            raise ForeignOptimizerStateError(
                f"the optimizer state being loaded was written by {describe_foreign_state(state_dict)}, not by "
                "muon_megatron's DeepSpeed Muon. To start Muon from this checkpoint's weights, load it with "
                "engine.load_checkpoint(path, load_optimizer_states=False, load_module_only=True)"
            )
        if marker.get("format") != STATE_FORMAT:
            raise ForeignOptimizerStateError(f"muon_megatron optimizer state format {marker.get('format')!r}, expected {STATE_FORMAT}")
        mine = self._signature()
        theirs = marker["groups"]
        if len(theirs) != len(mine):
            raise ForeignOptimizerStateError(
                f"checkpoint has {len(theirs)} optimizer param groups, this run {len(mine)}; the Muon/AdamW "
                "routing (adamw / muon patterns, splits) must match the run that saved it"
            )
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if a["use_muon"] != b["use_muon"] or a["names"] != b["names"]:
                diff = sorted(set(a["names"]) ^ set(b["names"]))[:4]
                raise ForeignOptimizerStateError(
                    f"param group {i} differs from the checkpoint's (use_muon {a['use_muon']} vs {b['use_muon']}; "
                    f"parameters only on one side: {diff}); the routing must match the run that saved it"
                )
            if a["numel"] != b["numel"]:
                raise ForeignOptimizerStateError(
                    f"param group {i}: local tensor sizes {a['numel']} differ from the checkpoint's {b['numel']}: "
                    "it was saved at another data-parallel size or ZeRO stage; convert it with ds_to_universal"
                )


def full_layout(name: str, param: torch.Tensor, split) -> ParamLayout:
    """The layout of a whole, unsharded parameter (ZeRO-0 without tensor parallelism)."""
    return ParamLayout(name, tuple(param.shape), split)
