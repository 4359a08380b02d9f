"""QK-Clip (Kimi K2's MuonClip) in DeepSpeed engines: ``optimizer.params.qk_clip_threshold``.

The rule and the max-logit recorder are the core's (:mod:`muon_megatron.core.qk_clip`); this
module wires them into a DeepSpeed engine:

- **Where queries and keys live**: one :class:`~muon_megatron.core.qk_clip.QKClipLayer` per
  attention layer, from the model's ``qk_clip_layers()`` method or
  ``muon_megatron.deepspeed.initialize(..., qk_clip_layers=[...])``. :func:`resolve_layers`
  checks them against the model and the Muon/AdamW routing at initialize.
- **Measuring**: :class:`QKClip` registers a forward pre-hook and a forward hook on the model, so
  every training-mode forward pass (each micro-batch) runs inside ``with recorder:``; the model's
  attention reports its per-head max logits through
  :func:`~muon_megatron.core.qk_clip.active_recorder`. The running max is kept until the optimizer
  step consumes it; the first forward pass of the next optimizer step (``engine.global_steps``
  moved on, also after a step DeepSpeed skipped for overflow) starts afresh.
- **Clipping**: at its first call in an optimizer step, :meth:`QKClip.begin_step` all-reduces
  (MAX, one collective) every declared layer's per-head maxima over the data-parallel group and
  computes the row factors. :class:`.optimizer.DeepSpeedMuon` then calls :meth:`QKClip.apply_`
  right after the Muon update of each param group (ZeRO-1/2: once per group; ZeRO-3: once per
  sub-group; ZeRO-0: once for all), before DeepSpeed copies the fp32 masters into the model's
  bf16/fp16 weights: the factors, sliced to the flat element ranges this rank holds, scale the
  q/k pieces in that group's tensors (the ZeRO partition, the fp32 master copy, or at ZeRO-0
  without mixed precision the model's weight itself). Every tensor is clipped at most once per
  optimizer step; nothing happens in a step DeepSpeed skips, and nothing changes when no head
  exceeded the threshold.
- **Telemetry**: :attr:`QKClip.last_stats` (a :class:`~muon_megatron.core.qk_clip.QKClipStats`:
  per layer the max logit before clipping and the number of clipped heads), logged at DEBUG and
  written to DeepSpeed's monitor (TensorBoard, CSV, W&B) when one is enabled.

Not supported (refused at initialize): tensor parallelism (a tensor-parallel ``mpu``) and
DeepSpeed-Ulysses sequence parallelism (heads spread over ranks would need per-rank head maps).
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.qk_clip import MaxLogitRecorder, QKClipLayer, QKClipStats, clip_factors, layer_stats, scale_flat_range_
from ..distributed.comm import collective_device
from .config import MuonConfig

logger = logging.getLogger(__name__)

_DOCS = "see the MuonClip section of docs/deepspeed.md"


def check_parallelism(*, tensor_parallel_size: int = 1, sequence_parallel_size: int = 1) -> None:
    """ValueError for the parallelisms QK-Clip does not support here (tensor, sequence)."""
    if tensor_parallel_size > 1:
        raise ValueError(
            f"optimizer.params.qk_clip_threshold with tensor parallelism (tensor-parallel size {tensor_parallel_size}) "
            "is not supported by muon_megatron's DeepSpeed Muon: run without tensor parallelism, or turn QK-Clip off "
            "(qk_clip_threshold null)"
        )
    if sequence_parallel_size > 1:
        raise ValueError(
            f"optimizer.params.qk_clip_threshold with sequence parallelism (sequence_parallel_size "
            f"{sequence_parallel_size}) is not supported by muon_megatron's DeepSpeed Muon: its attention heads are "
            "spread over ranks; run without it, or turn QK-Clip off (qk_clip_threshold null)"
        )


def resolve_layers(model: torch.nn.Module, given: Optional[Sequence[QKClipLayer]],
                   groups: Sequence[dict]) -> tuple[QKClipLayer, ...]:
    """The declared attention layers of ``model`` (``given`` when not None, else
    ``model.qk_clip_layers()``), checked against the model and the routing ``groups``
    (:func:`.activation.build_param_groups`).

    ValueError naming the model's class when: no layer is declared; an entry is not a
    :class:`QKClipLayer`; two share a recorder name; a declared parameter does not exist, has
    other rows than the layer's head counts imply, is not trained, or is routed to AdamW (QK-Clip
    scales Muon matrices)."""
    owner = type(model).__name__
    source = "muon_megatron.deepspeed.initialize(qk_clip_layers=...)"
    if given is None:
        declare = getattr(model, "qk_clip_layers", None)
        if not callable(declare):
            raise ValueError(
                f"optimizer.params.qk_clip_threshold is set, but the model {owner} declares no attention layers for "
                "QK-Clip: give it a qk_clip_layers() method returning one muon_megatron.core.qk_clip.QKClipLayer per "
                "attention layer, or pass muon_megatron.deepspeed.initialize(..., qk_clip_layers=[...]) "
                f"({_DOCS})"
            )
        given, source = declare(), f"{owner}.qk_clip_layers()"
    layers = tuple(given)
    if not layers:
        raise ValueError(
            f"optimizer.params.qk_clip_threshold is set, but {source} declares no attention layer of the model "
            f"{owner}: declare each attention layer whose queries and keys QK-Clip should scale ({_DOCS})"
        )
    bad = [type(layer).__name__ for layer in layers if not isinstance(layer, QKClipLayer)]
    if bad:
        raise ValueError(f"{source} must give muon_megatron.core.qk_clip.QKClipLayer entries; got {bad[:3]}")
    seen: dict[str, QKClipLayer] = {}
    for layer in layers:
        if layer.name in seen:
            raise ValueError(f"{source}: two layers share the recorder name {layer.name!r}; each attention layer "
                             "records under its own name")
        seen[layer.name] = layer
    params = dict(model.named_parameters())
    route = {}
    for g in groups:
        for name in g["names"]:
            route[name] = bool(g["use_muon"])
    for layer in layers:
        for name, rows in layer.rows().items():
            where = f"{source}, layer {layer.name!r}"
            if name not in params:
                tail = name.split(".")[-2:]
                similar = [n for n in params if n.split(".")[-2:] == tail][:3]
                raise ValueError(f"{where}: the model {owner} has no parameter {name!r}"
                                 + (f" (parameters ending alike: {similar})" if similar else ""))
            shape = tuple(getattr(params[name], "ds_shape", params[name].shape))
            if len(shape) < 2 or shape[0] != rows:
                raise ValueError(f"{where}: parameter {name!r} of {owner} has shape {shape}, but the layer's head "
                                 f"counts give {rows} rows ({layer.layout} layout); check num_heads, "
                                 "num_query_groups and the head dimensions")
            if name not in route:
                raise ValueError(f"{where}: parameter {name!r} of {owner} is not trained by the optimizer "
                                 "(requires_grad is False, or it was left out of model_parameters)")
            if not route[name]:
                raise ValueError(f"{where}: parameter {name!r} of {owner} is routed to AdamW; QK-Clip scales Muon "
                                 "matrices: remove it from optimizer.params.adamw (or add it to optimizer.params.muon)")
    return layers


class QKClip:
    """QK-Clip's runtime in one DeepSpeed engine (see the module docstring).

    Args:
        layers: the checked declarations (:func:`resolve_layers`).
        config: the :class:`MuonConfig` with ``qk_clip_threshold`` set.
        engine: the DeepSpeed engine (held weakly): its ``global_steps`` tells optimizer steps
            apart, its ``monitor`` receives the telemetry.
        pieces: ``describe()``'s :class:`.optimizer.GroupPieces`, the ones the optimizer was bound with.
        process_group: the data-parallel group the max logits are reduced over.
    """

    def __init__(self, layers: Sequence[QKClipLayer], config: MuonConfig, *, engine, pieces, process_group):
        if not config.qk_clip:
            raise ValueError("QKClip needs optimizer.params.qk_clip_threshold")
        self.layers = tuple(layers)
        self.tau = float(config.qk_clip_threshold)
        self.alpha = float(config.qk_clip_alpha)
        self.gqa_rule = config.qk_clip_gqa_rule
        self.process_group = process_group
        self.recorder = MaxLogitRecorder()
        self.last_stats: Optional[QKClipStats] = None
        self._engine = weakref.ref(engine)
        self._rows = {name: rows for layer in self.layers for name, rows in layer.rows().items()}
        # ids of an inner optimizer's tensors -> [(tensor, layout, offset)] of the declared parameters
        self._pieces: dict[tuple[int, ...], list] = {}
        for desc in pieces:
            if desc.layouts is None:
                continue
            held = []
            for tensor, entries in zip(desc.tensors, desc.layouts):
                for layout, offset in entries:
                    if layout.key in self._rows:
                        if layout.shard is not None:
                            raise ValueError(f"QK-Clip: {layout.key!r} is a tensor-parallel shard; not supported")
                        if layout.full_shape[0] != self._rows[layout.key]:
                            raise ValueError(f"QK-Clip: {layout.key!r} is held with shape {layout.full_shape}, "
                                             f"expected {self._rows[layout.key]} rows")
                        held.append((tensor, layout, int(offset)))
            if held:
                self._pieces.setdefault(tuple(id(t) for t in desc.tensors), []).extend(held)
        self._recording_step = None  # engine.global_steps of the recorder's maxima
        self._prepared_step = None  # engine.global_steps whose factors are in _scales
        self._scales: dict[str, torch.Tensor] = {}  # parameter name -> row factors (float64)
        self._scales_on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._applied: set[tuple[int, ...]] = set()
        self._entered: list[bool] = []
        self._handles: list = []

    # -- measuring -------------------------------------------------------------------------------

    def _step_id(self) -> Optional[int]:
        engine = self._engine()
        return None if engine is None else int(engine.global_steps)

    def install_hooks(self, model: torch.nn.Module) -> None:
        """Make every training-mode forward pass of ``model`` run inside ``with self.recorder:``."""

        def enter(module, args):
            active = bool(module.training)
            if active:
                step = self._step_id()
                if step != self._recording_step:  # the first forward pass of a new optimizer step
                    self.recorder.reset()
                    self._recording_step = step
                self.recorder.__enter__()
            self._entered.append(active)

        def leave(module, args, output):
            if self._entered and self._entered.pop():
                self.recorder.__exit__(None, None, None)

        self._handles = [model.register_forward_pre_hook(enter),
                         model.register_forward_hook(leave, always_call=True)]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the step --------------------------------------------------------------------------------

    def begin_step(self) -> None:
        """At every call of the optimizer's step: the first call of an optimizer step reduces the
        max logits (a collective over the data-parallel group) and computes the factors."""
        step = self._step_id()
        if step is not None and step == self._prepared_step:
            return
        self._prepared_step = step
        self._applied = set()
        self._scales, self._scales_on_device = {}, {}
        maxima = self.recorder.consume() if self._recording_step == step else {}
        self.recorder.reset()
        reduced = self._reduce(maxima)
        gammas: dict[str, Optional[torch.Tensor]] = {}
        for layer in self.layers:
            S = reduced[layer.name]
            gamma = clip_factors(S, self.tau) if bool(torch.isfinite(S).all()) else None
            gammas[layer.name] = gamma
            if gamma is not None:
                self._scales.update(layer.row_scales(gamma, alpha=self.alpha, gqa_rule=self.gqa_rule,
                                                     dtype=torch.float64))
        self.last_stats = layer_stats(self.tau, reduced, gammas)
        self._report(self.last_stats)

    def _reduce(self, maxima: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every declared layer's per-head maxima, MAX over the data-parallel group (one collective)."""
        device = collective_device(self.process_group)
        parts = []
        for layer in self.layers:
            value = maxima.get(layer.name)
            if value is None:
                value = torch.full((layer.num_heads,), -math.inf, dtype=torch.float32)
            elif value.numel() != layer.num_heads:
                raise ValueError(f"QK-Clip: layer {layer.name!r} recorded {value.numel()} per-head max logits, but is "
                                 f"declared with num_heads={layer.num_heads}")
            parts.append(value.detach().to(device=device, dtype=torch.float32))
        flat = torch.cat(parts)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.process_group)
        sizes = [layer.num_heads for layer in self.layers]
        reduced = dict(zip((layer.name for layer in self.layers), torch.split(flat, sizes)))
        missing = [name for name, S in reduced.items() if bool(torch.isneginf(S).all())]
        if missing:
            recorded = sorted(n for n in reduced if n not in missing)
            raise RuntimeError(
                f"QK-Clip: no max logits were recorded for the declared attention layers {missing[:4]} during this "
                f"optimizer step's forward passes (recorded: {recorded[:4] or 'none'}). Their attention must report "
                "through muon_megatron.core.qk_clip.active_recorder() under the declared names, and training forward "
                f"passes must go through the model given to initialize ({_DOCS})"
            )
        for name, S in reduced.items():
            if not bool(torch.isfinite(S).all()):
                if bool(torch.isnan(S).any() | torch.isposinf(S).any()):
                    logger.warning("QK-Clip: layer %s has non-finite max logits %s this step; not clipped", name,
                                   S.tolist())
                else:  # heads all of whose logits were masked out: nothing to clip
                    reduced[name] = torch.where(torch.isneginf(S), torch.zeros_like(S), S)
        return reduced

    def _factors(self, name: str, device: torch.device) -> Optional[torch.Tensor]:
        scales = self._scales.get(name)
        if scales is None:
            return None
        key = (name, device)
        if key not in self._scales_on_device:
            self._scales_on_device[key] = scales.to(device)
        return self._scales_on_device[key]

    @torch.no_grad()
    def apply_(self, tensor_ids: tuple[int, ...]) -> None:
        """Scale the declared q/k pieces held in the tensors ``tensor_ids`` (one inner optimizer's,
        just updated), once per optimizer step."""
        if tensor_ids in self._applied:
            return
        self._applied.add(tensor_ids)
        if not self._scales:
            return
        for tensor, layout, offset in self._pieces.get(tensor_ids, ()):
            factors = self._factors(layout.key, tensor.device)
            if factors is None:
                continue
            start, stop = layout.kept_range
            row_length = math.prod(layout.full_shape[1:])
            scale_flat_range_(tensor.view(-1).narrow(0, offset, stop - start), factors, row_length=row_length,
                              start=start)

    # -- telemetry -------------------------------------------------------------------------------

    def _report(self, stats: QKClipStats) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            for name in stats.max_logit:
                logger.debug("QK-Clip step %s: %s max logit %.4g, %d head(s) clipped (tau %g)", self._prepared_step,
                             name, stats.max_logit[name], stats.clipped_heads[name], self.tau)
        engine = self._engine()
        monitor = getattr(engine, "monitor", None)
        if monitor is None or not getattr(monitor, "enabled", False) or getattr(engine, "global_rank", 0) != 0:
            return
        samples = int(engine.global_samples) + int(engine.train_batch_size())  # as the step's loss is written
        events = [("Train/Samples/qk_clip_max_logit", stats.max_logit_overall, samples),
                  ("Train/Samples/qk_clip_clipped_heads", stats.clipped_heads_total, samples)]
        for name in stats.max_logit:
            events.append((f"Train/Samples/qk_clip_max_logit/{name}", stats.max_logit[name], samples))
            events.append((f"Train/Samples/qk_clip_clipped_heads/{name}", stats.clipped_heads[name], samples))
        monitor.write_events(events)
