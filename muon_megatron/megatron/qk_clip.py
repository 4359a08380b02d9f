"""QK-Clip (Kimi K2's MuonClip) in the Megatron adapter: measure, reduce, clip after the Muon step.

With ``MuonSettings.qk_clip_threshold`` (``--muon-qk-clip-threshold TAU``) set,
:func:`~muon_megatron.megatron.get_muon_optimizer` finds every attention layer of the model
chunks (:func:`describe_attention`), builds a :class:`MegatronQKClip` and hands it to the dense
inner optimizer (:class:`.inner.MegatronMuon`). The rule and the row factors are the core's
(:mod:`muon_megatron.core.qk_clip`); this module only says where Megatron keeps the pieces.

**Measured** where the logits happen, on this rank's heads (tensor parallelism splits heads):

- megatron-core's local ``DotProductAttention`` (``--transformer-impl local``, MHA and GQA): a
  forward pre-hook computes each head's max of ``q . k * softmax_scale`` from the (rotated) q and
  k the module receives, under the mask it receives (else causal), with
  :func:`~muon_megatron.core.qk_clip.per_head_max_logits` (float32, chunked over query
  positions). This computes the attention scores once more.
- the project's ``SDPACoreAttention`` (multi-latent attention with the local spec, see
  :mod:`.local_spec`): it records itself; hooks make the recorder active around its forward.
- megatron-core's ``TEDotProductAttention`` (Transformer Engine): Transformer Engine >= 2.9
  returns the max logits itself (``DotProductAttention(return_max_logit=True)``: the max of
  ``mask(q k^T * softmax_scale + bias)`` per head, shape ``[heads]``); megatron-core 0.16 / 0.19
  ask for them when the ``TransformerConfig`` has ``log_max_attention_logit`` (or ``qk_clip``)
  and keep their running max in ``core_attention.current_max_attn_logits``, which a forward hook
  moves into the recorder. ``install()`` sets ``--log-max-attention-logit`` for this. Transformer
  Engine is not installed where the test suite runs: this path is written against those
  documented attributes, guarded (a TE attention without them is refused), and not exercised
  by the CPU tests.

Only forward passes in training mode count (evaluation passes do not). The recorder keeps a
running max over the micro-batches of the step; a forward recomputed for activation
checkpointing records the same values again, which changes nothing.

**Reduced**: when the wrapper prepares the step's gradients (``prepare_grads``, every step,
taken or skipped) the step's maxima leave the recorder (:meth:`MegatronQKClip.take`); a skipped
step (non-finite gradients, or a gradient norm over megatron-core's skip threshold) discards
them. After the Muon step, **one** MAX all-reduce over the tensor x data x context parallel
ranks of the pipeline stage carries every layer's full ``[heads]`` vector (each tensor-parallel
rank fills its own heads, -inf elsewhere), so the data- and context-parallel max is taken and
every rank also knows the whole layer (for telemetry); each tensor-parallel rank then builds the
factors of its own heads.

**Applied** right after the Muon step, inside the wrapper's ``step_with_ready_grads`` and before
megatron-core copies main parameters to the model (``_copy_main_params_to_model_params``), to
the fp32 main parameters the optimizer updates: the whole tensor-parallel shard without the
distributed optimizer (sliced rows with :func:`~muon_megatron.core.qk_clip.scale_rows_`), this
DP rank's flat range of it with the distributed optimizer
(:func:`~muon_megatron.core.qk_clip.scale_flat_range_`). The model's bf16/fp16 copies follow
through megatron-core's own copy and, with the distributed optimizer, its param all-gather, so
they equal the clipped main parameters rounded; fp32 models without the distributed optimizer
have no separate main parameters. Fused QKV (``linear_qkv``, value rows untouched) and MLA
(``linear_q_proj`` or ``linear_q_up_proj``, and ``linear_kv_up_proj``; the shared rotary key in
``linear_kv_down_proj`` untouched) weights, and their biases where they have them (a bias row is
part of the head's q or k). Nothing changes when no head exceeds tau; QK-Clip keeps no state, so
checkpoints are unaffected.

**Refused** at optimizer construction, naming the module: attention whose core attention cannot
report max logits (another class, Transformer Engine attention without
``log_max_attention_logit``, sliding-window local attention, CUDA graphs), query/key
normalisation after the projection (``--qk-layernorm`` / ``--qk-l2-norm`` on ``SelfAttention``,
which would undo the scale; MLA's latent norms come before the up-projections and are fine),
``attention_output_gate`` (other fused rows), fewer query groups than tensor-parallel ranks,
attention classes other than ``SelfAttention`` and multi-latent attention, frozen q/k weights.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.qk_clip import (
    MaxLogitRecorder,
    QKClipStats,
    clip_factors,
    fused_qkv_row_scales,
    layer_stats,
    mla_kv_up_row_scales,
    mla_q_row_scales,
    scale_flat_range_,
    scale_rows_,
    validate_qk_clip,
)
from ..distributed.comm import any_rank, collective_device
from .params import _strip

__all__ = ["ClipLayer", "ClipTarget", "MegatronQKClip", "build_qk_clip", "describe_attention"]

logger = logging.getLogger(__name__)

ROLES = ("qkv", "mla_q", "mla_kv_up")
SOURCES = ("local", "sdpa", "te")
_FLAG = "--muon-qk-clip-threshold"


@dataclass(frozen=True, eq=False)
class ClipTarget:
    """One tensor QK-Clip scales: a weight or bias of a query/key projection (this rank's
    tensor-parallel shard, whole heads, rows ``[heads or groups, ...]`` head-major). ``role``:
    ``"qkv"`` (fused QKV), ``"mla_q"`` (MLA query projection), ``"mla_kv_up"`` (MLA key/value
    up-projection)."""

    name: str
    param: torch.nn.Parameter
    role: str


@dataclass(frozen=True, eq=False)
class ClipLayer:
    """One attention layer on this rank: where its max logits come from and what to scale.

    ``name``: the recorder key (``"layer<n>"``, Megatron's global 1-based layer number, unique
    over pipeline stages); ``source``: ``"local"`` / ``"sdpa"`` / ``"te"`` (see the module
    docstring); heads: ``local_heads`` of ``total_heads`` starting at ``head_offset`` (this
    tensor-parallel rank's); ``local_groups`` / ``head_dim`` for fused QKV, ``qk_nope`` /
    ``qk_rope`` / ``v_head`` for MLA."""

    name: str
    module_name: str
    kind: str
    source: str
    core: torch.nn.Module
    total_heads: int
    head_offset: int
    local_heads: int
    local_groups: int
    head_dim: int = 0
    qk_nope: int = 0
    qk_rope: int = 0
    v_head: int = 0
    targets: tuple[ClipTarget, ...] = ()

    def row_scales(self, role: str, gamma: torch.Tensor, alpha: float, gqa_rule: str) -> torch.Tensor:
        """Float64 factors for every row of a ``role`` tensor of this layer, from the gamma of
        this rank's heads (``[local_heads]``)."""
        if role == "qkv":
            return fused_qkv_row_scales(gamma, num_query_groups=self.local_groups, head_dim=self.head_dim, alpha=alpha,
                                        gqa_rule=gqa_rule, dtype=torch.float64)
        if role == "mla_q":
            return mla_q_row_scales(gamma, qk_nope_head_dim=self.qk_nope, qk_rope_head_dim=self.qk_rope, alpha=alpha,
                                    dtype=torch.float64)
        if role == "mla_kv_up":
            return mla_kv_up_row_scales(gamma, qk_nope_head_dim=self.qk_nope, v_head_dim=self.v_head, alpha=alpha,
                                        dtype=torch.float64)
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")


# --- finding the attention layers ------------------------------------------------------------------


def _is_identity(module) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return module is None or isinstance(module, IdentityOp)


def _uses_cuda_graphs(config) -> bool:
    return bool(getattr(config, "enable_cuda_graph", False) or getattr(config, "external_cuda_graph", False)
                or getattr(config, "cuda_graph_impl", "none") not in ("none", None))


def _source(core, name: str, problems: list[str]) -> Optional[str]:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from ..models.mla_attention import SDPACoreAttention

    where = f"{name}.core_attention ({type(core).__name__})"
    if isinstance(core, SDPACoreAttention):
        return "sdpa"
    if isinstance(core, DotProductAttention):
        if getattr(getattr(core, "scale_mask_softmax", None), "window_size", None) is not None:
            problems.append(f"{where}: sliding-window attention (--window-size), whose mask the max-logit hook does "
                            "not know")
            return None
        return "local"
    if any(c.__name__ == "TEDotProductAttention" for c in type(core).__mro__):
        if not hasattr(core, "current_max_attn_logits"):
            problems.append(
                f"{where}: Transformer Engine attention reports max logits only when built with "
                "log_max_attention_logit=True in the TransformerConfig (--log-max-attention-logit; Transformer Engine "
                ">= 2.9's return_max_logit; install() sets it for you)"
            )
            return None
        return "te"
    problems.append(f"{where} cannot report max logits (supported: megatron-core's local DotProductAttention, "
                    "muon_megatron's SDPACoreAttention, TEDotProductAttention with Transformer Engine >= 2.9)")
    return None


def _targets(name: str, modules: Sequence[tuple[str, torch.nn.Module, str]], problems: list[str]) -> tuple:
    out = []
    for sub, module, role in modules:
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if not isinstance(p, torch.nn.Parameter):
                continue
            pname = f"{name}.{sub}.{attr}"
            if not p.requires_grad:
                problems.append(f"{pname} is frozen: QK-Clip scales the query/key weights the optimizer updates")
            out.append(ClipTarget(pname, p, role))
    return tuple(out)


def _describe(name: str, m, tp: int, tp_rank: int, problems: list[str]) -> Optional[ClipLayer]:
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    cfg = m.config
    before = len(problems)
    if _uses_cuda_graphs(cfg):
        problems.append(f"{name}: CUDA graphs (--cuda-graph-impl / --enable-cuda-graph) replay attention without the "
                        "max-logit hooks")
    heads = m.num_attention_heads_per_partition
    if heads * tp != cfg.num_attention_heads:
        problems.append(f"{name}: {heads} heads on each of {tp} tensor-parallel ranks, {cfg.num_attention_heads} in "
                        "all; this layout is not supported")
    if isinstance(m, MultiLatentAttention):
        q_name = "linear_q_proj" if cfg.q_lora_rank is None else "linear_q_up_proj"
        q_mod, kv_mod = getattr(m, q_name, None), getattr(m, "linear_kv_up_proj", None)
        if q_mod is None or kv_mod is None:
            problems.append(f"{name}: multi-latent attention without {q_name} / linear_kv_up_proj (absorbed for "
                            "inference?)")
            return None
        source = _source(m.core_attention, name, problems)
        targets = _targets(name, [(q_name, q_mod, "mla_q"), ("linear_kv_up_proj", kv_mod, "mla_kv_up")], problems)
        layer = ClipLayer(
            name=f"layer{m.layer_number}", module_name=name, kind="mla", source=source or "", core=m.core_attention,
            total_heads=cfg.num_attention_heads, head_offset=tp_rank * heads, local_heads=heads, local_groups=heads,
            qk_nope=cfg.qk_head_dim, qk_rope=cfg.qk_pos_emb_head_dim, v_head=cfg.v_head_dim, targets=targets,
        )
    elif isinstance(m, SelfAttention):
        if getattr(cfg, "qk_l2_norm", False) or not (_is_identity(getattr(m, "q_layernorm", None))
                                                     and _is_identity(getattr(m, "k_layernorm", None))):
            problems.append(f"{name}: query/key normalisation after the projection (--qk-layernorm / --qk-l2-norm) "
                            "undoes QK-Clip's scale; drop it or QK-Clip")
        if getattr(cfg, "attention_output_gate", False):
            problems.append(f"{name}: --attention-output-gate puts gate rows into linear_qkv; not supported with "
                            "QK-Clip")
        groups = cfg.num_query_groups or cfg.num_attention_heads
        if groups < tp:
            problems.append(f"{name}: {groups} query groups over {tp} tensor-parallel ranks (a key head split over "
                            "ranks); QK-Clip needs --num-query-groups >= --tensor-model-parallel-size")
        source = _source(m.core_attention, name, problems)
        targets = _targets(name, [("linear_qkv", m.linear_qkv, "qkv")], problems)
        layer = ClipLayer(
            name=f"layer{m.layer_number}", module_name=name, kind="fused_qkv", source=source or "",
            core=m.core_attention, total_heads=cfg.num_attention_heads, head_offset=tp_rank * heads,
            local_heads=heads, local_groups=max(1, groups // tp), head_dim=m.hidden_size_per_attention_head,
            targets=targets,
        )
    else:
        problems.append(f"{name} ({type(m).__name__}): QK-Clip handles SelfAttention (fused linear_qkv) and "
                        "multi-latent attention")
        return None
    return layer if len(problems) == before else None


def describe_attention(model_chunks: Sequence[torch.nn.Module]) -> list[ClipLayer]:
    """Every attention layer of ``model_chunks`` on this rank, as QK-Clip sees it.

    ValueError naming each module QK-Clip cannot serve (see the module docstring), and when no
    rank holds any attention layer (checked with one all-reduce when torch.distributed is
    initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.attention import Attention

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    layers: list[ClipLayer] = []
    problems: list[str] = []
    for index, chunk in enumerate(model_chunks):
        prefix = f"chunk{index}." if len(model_chunks) > 1 else ""
        inside: list[str] = []
        for mod_name, m in chunk.named_modules():
            name = prefix + _strip(mod_name)
            if isinstance(m, Attention):
                inside.append(name + ".")
                layer = _describe(name, m, tp, tp_rank, problems)
                if layer is not None:
                    layers.append(layer)
            elif hasattr(m, "core_attention") and not any(name.startswith(p) for p in inside):
                problems.append(f"{name} ({type(m).__name__}): an attention module QK-Clip does not know")
    if problems:
        raise ValueError(f"{_FLAG}: QK-Clip cannot serve this model: " + "; ".join(problems))
    if not any_rank(bool(layers)):
        raise ValueError(f"{_FLAG}: the model has no attention layer to clip")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):  # e.g. extra layers numbered like decoder layers: use module names
        layers = [_renamed(layer) for layer in layers]
    return layers


def _renamed(layer: ClipLayer) -> ClipLayer:
    from dataclasses import replace

    return replace(layer, name=layer.module_name)


# --- measuring -------------------------------------------------------------------------------------


def _argument(args: tuple, kwargs: dict, index: int, key: str):
    return args[index] if len(args) > index else kwargs.get(key)


def _local_pre_hook(recorder: MaxLogitRecorder, name: str, module, args, kwargs):
    """megatron-core's ``DotProductAttention.forward(query [sq, b, heads, d], key [sk, b, groups, d],
    value, attention_mask, ...)``: record the per-head max logit of what its softmax will see
    (``softmax_scale`` times the softmax's own ``scale``, which ``apply_query_key_layer_scaling``
    splits off; Megatron's mask when given, else causal for a causal layer)."""
    if not module.training:
        return None
    query, key = _argument(args, kwargs, 0, "query"), _argument(args, kwargs, 1, "key")
    mask = _argument(args, kwargs, 3, "attention_mask")
    extra = getattr(getattr(module, "scale_mask_softmax", None), "scale", None)
    scale = module.softmax_scale * (extra if extra is not None else 1.0)
    kind = getattr(module.attn_mask_type, "name", module.attn_mask_type)
    causal = mask is None and kind == "causal" and query.shape[0] > 1
    recorder.record_logits(name, query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), scale=scale, causal=causal,
                           masked_out=mask)
    return None


def _te_hook(recorder: MaxLogitRecorder, name: str, module, args, output):
    """megatron-core's ``TEDotProductAttention`` keeps the running max of Transformer Engine's
    ``return_max_logit`` output in ``current_max_attn_logits`` (``[heads]``); move it into the
    recorder (training passes only) and reset it, so megatron-core's running max never mixes
    steps or evaluation passes."""
    value = getattr(module, "current_max_attn_logits", None)
    module.current_max_attn_logits = None
    if module.training and value is not None:
        recorder.record(name, value.detach().reshape(-1))


class _Activate:
    """Forward pre/post hooks making ``recorder`` active around a module's forward (training only)."""

    def __init__(self, recorder: MaxLogitRecorder):
        self.recorder = recorder
        self.entered: list[bool] = []

    def enter(self, module, args):
        self.entered.append(bool(module.training))
        if self.entered[-1]:
            self.recorder.__enter__()

    def exit(self, module, args, output):
        if self.entered and self.entered.pop():
            self.recorder.__exit__(None, None, None)


_HOOKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # core attention -> MegatronQKClip hooked on it


# --- the controller ---------------------------------------------------------------------------------


class MegatronQKClip:
    """QK-Clip for one model: hooks that measure, and :meth:`apply_` after each Muon step.

    ``layers``: :func:`describe_attention`'s; ``group``: the process group of the MAX all-reduce
    (the tensor x data x context parallel ranks of this pipeline stage; None: no reduction).
    After construction call :meth:`attach` (hooks) and :meth:`bind_main_params` (where the
    optimizer keeps each q/k tensor). ``last_stats`` / ``last_maxima``: the last step's telemetry
    and, per layer, the reduced max logit of every head (``[total_heads]``, float64 on the CPU,
    measured in float32 before clipping). Collective: :meth:`apply_` is called on every rank of
    ``group`` (by the dense :class:`.inner.MegatronMuon` after each taken step)."""

    def __init__(self, layers: Sequence[ClipLayer], *, tau: float, alpha: float = 0.5, gqa_rule: str = "per_head",
                 group=None):
        validate_qk_clip(tau, alpha, gqa_rule)
        self.layers = list(layers)
        self.tau, self.alpha, self.gqa_rule = float(tau), float(alpha), gqa_rule
        self.group = group
        self.recorder = MaxLogitRecorder()
        self.last_stats: Optional[QKClipStats] = None
        self.last_maxima: dict[str, torch.Tensor] = {}
        self._pending: Optional[dict] = None
        self._handles: list = []
        self._mains: dict = {}
        self._sharded = False

    # -- wiring ---------------------------------------------------------------------------------

    def attach(self) -> "MegatronQKClip":
        """Register the measuring hooks on every layer's core attention (replacing those of an
        earlier :class:`MegatronQKClip` on the same modules)."""
        self.detach()
        for layer in self.layers:
            core = layer.core
            previous = _HOOKED.get(core)
            if previous is not None and previous is not self:
                previous.detach()
            if layer.source == "local":
                self._handles.append(core.register_forward_pre_hook(
                    functools.partial(_local_pre_hook, self.recorder, layer.name), with_kwargs=True))
            elif layer.source == "sdpa":
                core.max_logit_name = layer.name
                activate = _Activate(self.recorder)
                self._handles.append(core.register_forward_pre_hook(activate.enter))
                self._handles.append(core.register_forward_hook(activate.exit, always_call=True))
            elif layer.source == "te":
                self._handles.append(core.register_forward_hook(functools.partial(_te_hook, self.recorder, layer.name)))
            else:
                raise ValueError(f"{layer.module_name}: unknown max-logit source {layer.source!r}")
            _HOOKED[core] = self
        return self

    def detach(self) -> None:
        """Remove this controller's hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in [m for m, owner in _HOOKED.items() if owner is self]:
            del _HOOKED[module]

    def bind_main_params(self, entries: Iterable[tuple[torch.nn.Parameter, torch.Tensor, Optional[int]]], *,
                         sharded: bool) -> None:
        """Where the optimizer keeps each model parameter: ``(model param, main tensor, flat start)``
        with ``flat start`` None when the main tensor holds the whole (tensor-parallel-local)
        parameter, else the offset of its flat range (``sharded``: the distributed optimizer,
        where a DP rank may hold no range of a parameter). RuntimeError naming a q/k tensor the
        optimizer does not hold when every rank should."""
        self._mains = {model: (main, start) for model, main, start in entries}
        self._sharded = sharded
        if not sharded:
            missing = [t.name for layer in self.layers for t in layer.targets if t.param not in self._mains]
            if missing:
                raise RuntimeError(f"QK-Clip: the optimizer holds no main parameter for {missing}")

    # -- one step -------------------------------------------------------------------------------

    def take(self) -> None:
        """End of the step's forward passes: its maxima leave the recorder (the wrapper calls this
        in ``prepare_grads``, before it knows whether the step will be taken)."""
        self._pending = self.recorder.consume()

    def discard(self) -> None:
        """The step was skipped: forget its maxima (nothing runs forward between ``prepare_grads``
        and the step, so the recorder holds nothing newer)."""
        self._pending = None
        self.recorder.reset()

    @torch.no_grad()
    def apply_(self) -> QKClipStats:
        """Reduce the step's maxima (one MAX all-reduce), clip the main parameters of the heads
        above tau and return the step's :class:`~muon_megatron.core.qk_clip.QKClipStats` (whole
        layers, all heads). Collective over ``group``."""
        if self._pending is None:
            self.take()
        pending, self._pending = self._pending, None
        missing = [layer.name for layer in self.layers if layer.name not in pending]
        sizes = [layer.total_heads for layer in self.layers]
        # every layer's heads, then one element that says whether some rank lacks a layer
        flat = torch.full((sum(sizes) + 1,), -math.inf, dtype=torch.float32, device=collective_device(self.group))
        offset = 0
        for layer, size in zip(self.layers, sizes):
            if layer.name in pending:
                start = offset + layer.head_offset
                flat[start : start + layer.local_heads] = pending[layer.name].to(flat.device)
            offset += size
        flat[-1] = 1.0 if missing else 0.0
        if self.group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.group)
        host = flat.to("cpu", torch.float64)  # one small transfer; the factors are built on the host
        if host[-1] > 0:
            raise RuntimeError(
                f"QK-Clip: no max logits were recorded this step for {missing or 'a layer of another rank'}: run the "
                "step's forward passes in training mode (model.train()) between optimizer steps"
            )
        maxima, gammas = {}, {}
        for layer, S in zip(self.layers, torch.split(host[:-1], sizes)):
            maxima[layer.name] = S
            gammas[layer.name] = self._clip_layer_(layer, S)
        stats = layer_stats(self.tau, maxima, gammas)
        self.last_stats, self.last_maxima = stats, maxima
        logger.debug("QK-Clip (tau %s): max logit per layer %s; heads clipped %s", self.tau,
                     {k: round(v, 4) for k, v in stats.max_logit.items()}, stats.clipped_heads)
        return stats

    def _clip_layer_(self, layer: ClipLayer, S: torch.Tensor) -> Optional[torch.Tensor]:
        if bool(torch.isnan(S).any() or torch.isposinf(S).any()):
            logger.warning("QK-Clip: layer %s has non-finite max logits %s; not clipped this step", layer.name,
                           S.tolist())
            return None
        # -inf: a head none of whose logits the mask allowed this step; nothing to clip there
        gamma = clip_factors(torch.where(torch.isneginf(S), torch.zeros_like(S), S), self.tau)
        if gamma is None:
            return None
        local = gamma[layer.head_offset : layer.head_offset + layer.local_heads]
        if not bool((local < 1).any()):  # this rank's heads all at or below tau: nothing to scale here
            return gamma
        for target in layer.targets:
            entry = self._mains.get(target.param)
            if entry is None:  # the distributed optimizer gave this DP rank no range of it
                continue
            main, start = entry
            scales = layer.row_scales(target.role, local, self.alpha, self.gqa_rule)
            if start is None:
                scale_rows_(main, scales)
            else:
                rows = target.param.shape[0]
                scale_flat_range_(main.view(-1), scales, row_length=target.param.numel() // rows, start=start)
        return gamma


def build_qk_clip(model_chunks: Sequence[torch.nn.Module], settings) -> Optional[MegatronQKClip]:
    """The :class:`MegatronQKClip` for ``settings`` (a :class:`.config.MuonSettings`), hooks
    attached, or None when ``settings.qk_clip_threshold`` is None. ValueError naming the module
    when the model cannot be served. Collective."""
    if settings.qk_clip_threshold is None:
        return None
    from megatron.core import parallel_state as ps

    layers = describe_attention(model_chunks)
    clip = MegatronQKClip(layers, tau=settings.qk_clip_threshold, alpha=settings.qk_clip_alpha,
                          gqa_rule=settings.qk_clip_gqa_rule,
                          group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
    sources: dict[str, int] = {}
    for layer in layers:
        sources[layer.source] = sources.get(layer.source, 0) + 1
    logger.info("muon-megatron QK-Clip: tau %s, alpha %s, GQA rule %r; %d attention layers on this rank, max logits "
                "from %s", clip.tau, clip.alpha, clip.gqa_rule, len(layers),
                ", ".join(f"{n} x {_SOURCE_WORDS[s]}" for s, n in sorted(sources.items())) or "none")
    return clip.attach()


_SOURCE_WORDS = {
    "local": "DotProductAttention (hook on q and k)",
    "sdpa": "SDPACoreAttention",
    "te": "Transformer Engine's return_max_logit",
}
