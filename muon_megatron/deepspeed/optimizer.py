"""``DeepSpeedMuon``: the client optimizer DeepSpeed wraps when ``"type": "muon"`` selects ours.

DeepSpeed builds its wrapper (the ZeRO-1/2/3 optimizer, the BF16_Optimizer, the fp16/bf16
optimizer of ZeRO-0, or none) around this object and replaces the tensors of its param groups with
its own (flat fp32 partitions, or fp32 master copies). :meth:`DeepSpeedMuon.bind` is then told, by
:mod:`.translate`, which pieces of which parameters each of those tensors holds, and builds one
:class:`muon_megatron.distributed.DistributedMuon` per description (a param group; under ZeRO-3
each sub-group of a param group) over its process group.

The wrapper calls :meth:`step` at the gradient-accumulation boundary only, with the gradients
already reduced over data parallelism, averaged over gradient accumulation, unscaled (fp16) and
clipped, and only when no rank overflowed. ZeRO-1/2 call it once per param group (with
``param_groups`` narrowed to that group); ZeRO-3 once per sub-group (that sub-group's flat
partition the only tensor in its group, every other group empty; every rank steps the same
sub-groups in the same order, since ZeRO-3 cuts sub-groups from partition sizes that are equal on
all ranks); ZeRO-0 and the BF16_Optimizer once for all groups. Each call steps the inner
optimizers whose tensors are in ``param_groups``: momentum on the local pieces, every matrix
orthogonalised once by one owner rank, the update applied locally; then, with
``qk_clip_threshold`` set, QK-Clip scales the query/key pieces of the tensors just updated
(:mod:`.qk_clip`). DeepSpeed then copies the fp32 partition to the model weights and all-gathers
them as it always does.

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

from ..core.base import checkpoint_group, finite_flags
from ..core.hyperparams import resolve_dtype
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

    tensors: the group's local tensors (as the DeepSpeed wrapper puts them into ``params``).
    layouts: per tensor, a list of ``(ParamLayout, flat offset in the tensor)``; None for AdamW.
    process_group: the ranks that hold pieces of this group's matrices (ZeRO: its DP group).
    group: the index of the param group these tensors step in; None: the description's position
        in the list given to :meth:`DeepSpeedMuon.bind` (one description per group, whose
        ``params`` already hold ``tensors``). ZeRO-3 gives several per group (its sub-groups),
        whose tensors enter ``params`` only while DeepSpeed steps them.
    ns_device: where Newton-Schulz runs when the tensors live elsewhere (optimizer offload to
        the CPU with an accelerator present); None: the tensors' device.
    """

    tensors: tuple
    layouts: Optional[tuple]
    process_group: object
    group: Optional[int] = None
    ns_device: Optional[torch.device] = None


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
        self._inner: list[DistributedMuon] = []
        # ids of the tensors an inner optimizer steps -> (param group index, inner optimizer)
        self._by_tensors: dict[tuple[int, ...], tuple[int, DistributedMuon]] = {}
        self._bound_tensors: Optional[list[list[torch.Tensor]]] = None  # per group, after bind
        self._orthogonalize = orthogonalizer(config.ns_backend)  # one, so shapes are timed once
        self.bound_to: Optional[str] = None
        self.qk_clip = None  # a .qk_clip.QKClip when optimizer.params.qk_clip_threshold is set

    # -- binding ---------------------------------------------------------------------------------

    def original_params(self, group_index: int) -> list[torch.nn.Parameter]:
        """The model parameters of group ``group_index`` as given at construction, in order."""
        return list(self._originals[group_index])

    def names(self, group_index: int) -> list[str]:
        return list(self._names[group_index])

    def bind(self, pieces: Sequence[GroupPieces], wrapper: str) -> None:
        """Build the distributed optimizers from the wrapper's tensors, one per description.

        Collective over each description's process group: every rank must call it with the
        descriptions in the same order. ``wrapper`` names the DeepSpeed wrapper, for messages.
        """
        positional = all(desc.group is None for desc in pieces)
        if positional and len(pieces) != len(self.param_groups):
            raise ValueError(f"bind: {len(pieces)} group descriptions for {len(self.param_groups)} param groups")
        indexed = [(i if desc.group is None else desc.group, desc) for i, desc in enumerate(pieces)]
        missing = set(range(len(self.param_groups))) - {i for i, _ in indexed}
        if missing or any(not 0 <= i < len(self.param_groups) for i, _ in indexed):
            raise ValueError(f"bind: the descriptions do not cover param groups {sorted(missing)} exactly")
        bound: list[list[torch.Tensor]] = [[] for _ in self.param_groups]
        for i, desc in indexed:
            group = self.param_groups[i]
            if desc.group is None and [id(t) for t in group["params"]] != [id(t) for t in desc.tensors]:
                raise ValueError(
                    f"bind: param group {i} holds other tensors than the description; {wrapper} changed the "
                    "optimizer's groups in a way muon_megatron does not understand"
                )
            private = {k: v for k, v in group.items() if k not in ("names", "split", "moe", "name")}
            private["params"] = list(desc.tensors)
            if group["use_muon"]:
                private["layouts"] = [list(entry) for entry in desc.layouts]
            inner = DistributedMuon([private], **self.config.optimizer_kwargs(), process_group=desc.process_group,
                                    orthogonalize=self._orthogonalize, ns_device=desc.ns_device)
            inner.state = self.state
            self._inner.append(inner)
            self._by_tensors[tuple(id(t) for t in desc.tensors)] = (i, inner)
            bound[i].extend(desc.tensors)
            if group["use_muon"]:
                logger.info("muon_megatron: group %d under %s: %s", i, wrapper, inner.plan.summary().replace("\n", "; "))
        self._bound_tensors = bound
        self.bound_to = wrapper

    def attach_qk_clip(self, qk_clip) -> None:
        """Apply ``qk_clip`` (a :class:`.qk_clip.QKClip`) after the Muon update of every step:
        :meth:`step` calls its ``begin_step`` first and its ``apply_`` after each inner optimizer's
        update (before DeepSpeed copies the fp32 masters into the model weights)."""
        if self.bound_to is None:
            raise RuntimeError("attach_qk_clip() before bind()")
        self.qk_clip = qk_clip

    @property
    def last_qk_clip_stats(self):
        """QK-Clip's telemetry of the last optimizer step (:class:`muon_megatron.core.qk_clip.QKClipStats`:
        per attention layer the max logit measured before clipping and the number of clipped
        heads), or None (QK-Clip off, or no step yet)."""
        return None if self.qk_clip is None else self.qk_clip.last_stats

    def group_tensors(self, group_index: int) -> list[torch.Tensor]:
        """The tensors group ``group_index`` steps, in order: after :meth:`bind` those of its
        descriptions (ZeRO-3: its sub-groups' partitions, which DeepSpeed puts into ``params`` only
        while stepping or checkpointing them); before, the group's ``params``."""
        if self._bound_tensors is None:
            return list(self.param_groups[group_index]["params"])
        return list(self._bound_tensors[group_index])

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
        """Step the tensors currently in ``param_groups`` (ZeRO-1/2 narrow it to one group, ZeRO-3
        fills one group with one sub-group's partition)."""
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
        groups = [g for g in self.param_groups if g["params"]]
        if len(groups) > 1 and not self._all_finite(groups):
            # ZeRO-0 steps all groups at once; keep them in lockstep (ZeRO-1/2/3 check overflow before us).
            warnings.warn("DeepSpeedMuon: non-finite gradient; step skipped for every group", RuntimeWarning)
            return loss
        if self.qk_clip is not None:
            self.qk_clip.begin_step()  # the first call of an optimizer step reduces the max logits
        for group in groups:
            key = tuple(id(t) for t in group["params"])
            try:
                _, inner = self._by_tensors[key]
            except KeyError:
                raise RuntimeError(
                    f"DeepSpeedMuon.step(): a param group holds tensors unknown at bind time (lr={group.get('lr')}); "
                    "param groups cannot be added or replaced after initialize"
                ) from None
            self._sync(group, inner)
            skipped = inner.skipped_steps
            inner.step()
            if self.qk_clip is not None and inner.skipped_steps == skipped:
                self.qk_clip.apply_(key)  # after the update, before DeepSpeed copies masters to the model
        return loss

    def inner_optimizers(self) -> list[DistributedMuon]:
        """The distributed optimizers built by :meth:`bind`, one per description (a param group;
        under ZeRO-3 a sub-group), in bind order."""
        return list(self._inner)

    # -- checkpoints -----------------------------------------------------------------------------

    def _signature(self) -> list[dict]:
        return [
            {"use_muon": bool(g["use_muon"]), "names": list(self._names[i]),
             "numel": [int(p.numel()) for p in self.group_tensors(i)]}
            for i, g in enumerate(self.param_groups)
        ]

    def state_dict(self) -> dict:
        """Per-group state packed by tensor index, hyper-parameters, and a ``"muon_megatron"``
        marker with the groups' parameter names (checked on load). Plain tensors and Python values
        only, so ``torch.load(weights_only=True)`` reads it."""
        state, groups, index = {}, [], 0
        for i, g in enumerate(self.param_groups):
            ids = []
            for p in self.group_tensors(i):
                if p in self.state and self.state[p]:
                    state[index] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.state[p].items()}
                ids.append(index)
                index += 1
            groups.append(dict(checkpoint_group(g, drop=("split", "names")), params=ids))
        return {"state": state, "param_groups": groups,
                "muon_megatron": {"format": STATE_FORMAT, "groups": self._signature()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` wrote for the same groups (same parameters, same
        data-parallel layout). Anything else raises :class:`ForeignOptimizerStateError` saying
        how to start from the weights alone."""
        self.check_state_dict(state_dict)
        saved_state = state_dict["state"]
        self.load_group_settings(state_dict["param_groups"])
        for i, saved in enumerate(state_dict["param_groups"]):
            for p, index in zip(self.group_tensors(i), saved["params"]):
                entry = saved_state.get(index, saved_state.get(str(index)))
                self.state.pop(p, None)
                if entry:
                    self.state[p] = {
                        k: (v.to(device=p.device, dtype=p.dtype if v.is_floating_point() and v.dim() else v.dtype)
                            if torch.is_tensor(v) else v)
                        for k, v in entry.items()
                    }

    def load_group_settings(self, saved_groups: Sequence[dict]) -> None:
        """Take the hyper-parameters (lr, momentum, ...) of saved param groups, one per group in
        order; the structure (parameters, routing, Newton-Schulz plan) stays this run's."""
        if len(saved_groups) != len(self.param_groups):
            raise ForeignOptimizerStateError(
                f"checkpoint has {len(saved_groups)} optimizer param groups, this run {len(self.param_groups)}"
            )
        for g, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key not in _STRUCTURAL_KEYS:
                    g[key] = value

    def check_routing(self, groups: Sequence[dict]) -> None:
        """Raise :class:`ForeignOptimizerStateError` unless ``groups`` (the ``"groups"`` of a
        checkpoint's ``"muon_megatron"`` marker) route the same parameters the same way as this run."""
        mine = self._signature()
        if len(groups) != len(mine):
            raise ForeignOptimizerStateError(
                f"checkpoint has {len(groups)} optimizer param groups, this run {len(mine)}; the Muon/AdamW "
                "routing (adamw / muon patterns, splits) must match the run that saved it"
            )
        for i, (a, b) in enumerate(zip(mine, groups)):
            if a["use_muon"] != b["use_muon"] or a["names"] != b["names"]:
                diff = sorted(set(a["names"]) ^ set(b["names"]))[:4]
                raise ForeignOptimizerStateError(
                    f"param group {i} differs from the checkpoint's (use_muon {a['use_muon']} vs {b['use_muon']}; "
                    f"parameters only on one side: {diff}); the routing must match the run that saved it"
                )

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
        theirs = marker["groups"]
        self.check_routing(theirs)
        for i, (a, b) in enumerate(zip(self._signature(), theirs)):
            if a["numel"] != b["numel"]:
                raise ForeignOptimizerStateError(
                    f"param group {i}: local tensor sizes {a['numel']} differ from the checkpoint's {b['numel']}: "
                    "it was saved at another data-parallel size or ZeRO stage; convert it with "
                    "python -m muon_megatron.deepspeed.universal and load it with checkpoint.load_universal"
                )


def full_layout(name: str, param: torch.Tensor, split) -> ParamLayout:
    """The layout of a whole, unsharded parameter (ZeRO-0 without tensor parallelism)."""
    return ParamLayout(name, tuple(param.shape), split)
