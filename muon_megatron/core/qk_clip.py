"""QK-Clip (Kimi K2's MuonClip) as pure tensor functions, and a recorder of per-head max logits.

After the optimizer step, every attention head ``h`` whose largest pre-softmax logit
``S_h = max_{i,j} q_i . k_j * softmax_scale`` (over the step's micro-batches and data- and
context-parallel ranks) exceeded a threshold ``tau`` gets its query and key weights scaled so that
the same inputs would have produced ``tau``::

    gamma_h = min(1, tau / S_h)          (1 for every head with S_h <= tau: nothing changes)
    W_q[h] *= gamma_h ** alpha           W_k[h] *= gamma_h ** (1 - alpha)

``alpha`` is megatron-core's ``qk_clip_alpha`` (default 0.5: ``sqrt(gamma)`` on each side, as in
Kimi K2). Every logit of the head is then multiplied by exactly ``gamma_h``, because a logit is
bilinear in the head's query and key rows, and RoPE (a rotation inside each head) commutes with a
per-head scale.

Layouts (rows of the weight ``[out, in]``; all functions build a per-row factor vector over the
full output dimension, which can be sliced to any row range):

- **Fused QKV** (megatron-core's ``linear_qkv``): ``[groups * (q_per_group + 2) * head_dim, hidden]``,
  per query group the rows of its ``q_per_group`` query heads, then its key head, then its value
  head. Value rows keep factor 1.
- **Separate projections** (``q_proj [heads * head_dim]``, ``k_proj [groups * head_dim]``, as in
  Hugging Face Llama-style models).
- **MLA** (DeepSeek-V3 / Moonlight): the query projection (``linear_q_proj``, or
  ``linear_q_up_proj`` with a q LoRA rank) ``[heads * (qk_nope + qk_rope), ...]``, per head the
  content part ``q^C`` then the rotary part ``q^R``; the key/value up-projection
  (``linear_kv_up_proj``) ``[heads * (qk_nope + v_head), kv_lora_rank]``, per head the content key
  ``k^C`` then the value. The rotary key ``k^R`` (the last ``qk_rope`` rows of
  ``linear_kv_down_proj``) is shared by all heads, so it is never scaled; instead ``q^R`` takes
  the whole ``gamma``: ``q^C *= gamma ** alpha``, ``k^C *= gamma ** (1 - alpha)``, ``q^R *= gamma``
  (Kimi K2 technical report; the same split as megatron-core's MLA ``clip_qk``).

**GQA**: a key head is shared by the ``q_per_group`` query heads of its group, so it can take only
one factor: ``gamma_g ** (1 - alpha)`` with ``gamma_g`` the *smallest* gamma of the group (from the
largest max logit among its query heads). The query heads then follow ``gqa_rule``:

- ``"per_head"`` (default): query head ``h`` gets ``gamma_h / gamma_g ** (1 - alpha)``, so each
  head's logits are multiplied by exactly its own ``gamma_h``: every clipped head lands on ``tau``,
  and a head that did not exceed ``tau`` keeps its logits (within float rounding) even when its
  group's key was scaled; its query rows are then scaled *up* by ``gamma_g ** (alpha - 1)``.
- ``"group"`` (megatron-core 0.16-0.19's ``clip_qk``): every query head of the group gets
  ``gamma_g ** alpha``, so all heads of a clipped group have their logits multiplied by
  ``gamma_g``: only the group's largest head lands on ``tau``, the others end below it.

With MHA (one query head per group) both rules are the same. Nothing is scaled in a group none of
whose heads exceeded ``tau``. Weights behind a normalisation of q or k (``qk_layernorm``) are not
clipped this way: the norm would undo the scale.

Applying factors: :func:`scale_rows_` scales a whole weight or any row range of it (a
tensor-parallel shard of a column-parallel projection holds whole heads, a contiguous row range);
:func:`scale_flat_range_` scales an element range of the row-major flattened weight (a ZeRO or
distributed-optimizer shard). Both compute in float32 (float64 for float64 weights) and round once,
so a bf16/fp16 model copy and its fp32 main parameter stay consistent; a factor of exactly 1 leaves
a row bitwise unchanged.

Measuring: :class:`MaxLogitRecorder` collects per-head max logits from attention modules, with a
running max over micro-batches, and packs all layers into one flat tensor for a single MAX
all-reduce over data/context-parallel ranks (done by the engine adapters). Attention code that
does not belong to this project reports through it:

    from muon_megatron.core.qk_clip import active_recorder

    def forward(self, q, k, v):                # q [b, heads, s, d], k [b, groups, s, d]
        recorder = active_recorder()
        if recorder is not None:               # only inside ``with recorder:``; else no cost
            recorder.record_logits(self.name, q, k, scale=self.softmax_scale, causal=True)
        ...

and the training loop runs the forward passes inside ``with recorder:`` and, after
``optimizer.step()``, computes :func:`clip_factors` from ``recorder.maxima`` and resets it.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

GQA_RULES = ("per_head", "group")

__all__ = [
    "GQA_RULES", "MaxLogitRecorder", "QKClipLayer", "QKClipStats", "QK_CLIP_LAYOUTS", "active_recorder", "clip_factors",
    "clip_fused_qkv_", "clip_mla_",
    "fused_qkv_row_scales", "k_row_scales", "layer_stats", "mla_kv_up_row_scales", "mla_q_row_scales",
    "per_head_max_logits", "q_row_scales", "scale_flat_range_", "scale_rows_", "validate_qk_clip",
]


# --- factors ---------------------------------------------------------------------------------------


def validate_qk_clip(tau: float, alpha: float = 0.5, gqa_rule: str = "per_head") -> None:
    """ValueError naming the parameter unless ``tau`` is a finite positive threshold, ``alpha`` lies
    in [0, 1] and ``gqa_rule`` is one of :data:`GQA_RULES`."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"qk_clip threshold tau must be a finite number > 0 (Kimi K2 uses 100); got {tau!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"qk_clip alpha must lie in [0, 1] (0.5 scales q and k by sqrt(gamma) each); got {alpha!r}")
    if gqa_rule not in GQA_RULES:
        raise ValueError(f"gqa_rule must be one of {GQA_RULES}; got {gqa_rule!r}")


def clip_factors(max_logits: torch.Tensor, tau: float) -> torch.Tensor | None:
    """Per-head ``gamma = min(1, tau / S_max)`` (float64, same shape and device as ``max_logits``),
    or ``None`` when no head's max logit exceeds ``tau`` (a head exactly at ``tau`` is not clipped).

    ``max_logits`` is 1-D ``[heads]`` (a rank's local heads under tensor parallelism). A NaN or
    infinite max logit raises ValueError: the step's forward pass already overflowed."""
    validate_qk_clip(tau)
    if max_logits.ndim != 1 or max_logits.numel() == 0:
        raise ValueError(f"max_logits must be a non-empty 1-D tensor [heads]; got shape {tuple(max_logits.shape)}")
    S = max_logits.detach().to(torch.float64)
    if not bool(torch.isfinite(S).all()):
        raise ValueError(f"max_logits hold non-finite values {S.tolist()}: the forward pass overflowed")
    over = S > tau
    if not bool(over.any()):
        return None
    # Only where S > tau > 0, so a negative max logit never produces a negative factor.
    return torch.where(over, tau / torch.where(over, S, torch.ones_like(S)), torch.ones_like(S))


def _group_factors(gamma: torch.Tensor, num_query_groups: int, alpha: float, gqa_rule: str):
    """(query factor per head ``[heads]``, key factor per group ``[groups]``), float64."""
    validate_qk_clip(1.0, alpha, gqa_rule)
    heads = gamma.numel()
    if gamma.ndim != 1:
        raise ValueError(f"gamma must be 1-D [heads]; got shape {tuple(gamma.shape)}")
    if num_query_groups < 1 or heads % num_query_groups:
        raise ValueError(f"num_query_groups={num_query_groups} must divide the number of query heads ({heads})")
    gamma = gamma.to(torch.float64)
    per_group = gamma.view(num_query_groups, heads // num_query_groups)
    gamma_g = per_group.amin(dim=1)  # the largest max logit of the group decides its shared key
    k_factor = gamma_g.pow(1.0 - alpha)
    g = gamma_g.repeat_interleave(heads // num_query_groups)
    if gqa_rule == "group":
        q_factor = g.pow(alpha)
    else:
        # gamma_h / gamma_g**(1 - alpha); written as g**alpha for the head that sets the group's
        # factor so MHA (and the group's largest head) gets exactly gamma**alpha.
        q_factor = torch.where(gamma == g, g.pow(alpha), gamma / g.pow(1.0 - alpha))
    return q_factor, k_factor


def _rows(per_head: torch.Tensor, rows_per_head: int, dtype: torch.dtype) -> torch.Tensor:
    return per_head.to(dtype).repeat_interleave(rows_per_head)


def fused_qkv_row_scales(gamma: torch.Tensor, *, num_query_groups: int, head_dim: int, alpha: float = 0.5,
                         gqa_rule: str = "per_head", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row factors ``[groups * (q_per_group + 2) * head_dim]`` for megatron-core's fused
    ``linear_qkv`` weight (per group: its query heads, its key, its value; values keep 1).

    ``gamma`` is ``[heads]`` for the heads this weight holds (under tensor parallelism the rank's
    own heads and groups; equal to the full-model vector sliced to the rank's rows)."""
    q, k = _group_factors(gamma, num_query_groups, alpha, gqa_rule)
    q = q.view(num_query_groups, -1)
    ones = torch.ones_like(k).unsqueeze(1)
    per_group = torch.cat([q, k.unsqueeze(1), ones], dim=1)  # [groups, q_per_group + 2]
    return per_group.reshape(-1).to(dtype).repeat_interleave(head_dim)


def q_row_scales(gamma: torch.Tensor, *, num_query_groups: int, head_dim: int, alpha: float = 0.5,
                 gqa_rule: str = "per_head", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row factors ``[heads * head_dim]`` for a separate query projection (head-major rows)."""
    q, _ = _group_factors(gamma, num_query_groups, alpha, gqa_rule)
    return _rows(q, head_dim, dtype)


def k_row_scales(gamma: torch.Tensor, *, num_query_groups: int, head_dim: int, alpha: float = 0.5,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row factors ``[groups * head_dim]`` for a separate key projection (one key head per group,
    scaled by ``gamma_g ** (1 - alpha)`` with ``gamma_g`` the smallest gamma of its query heads)."""
    _, k = _group_factors(gamma, num_query_groups, alpha, "per_head")
    return _rows(k, head_dim, dtype)


def _mla_dims(**dims: int) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}")


def mla_q_row_scales(gamma: torch.Tensor, *, qk_nope_head_dim: int, qk_rope_head_dim: int, alpha: float = 0.5,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row factors ``[heads * (qk_nope + qk_rope)]`` for MLA's ``linear_q_proj`` /
    ``linear_q_up_proj``: per head ``gamma ** alpha`` on the content rows ``q^C`` and ``gamma`` on the
    rotary rows ``q^R`` (the rotary key is shared and left alone)."""
    validate_qk_clip(1.0, alpha)
    _mla_dims(qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim)
    g = gamma.to(torch.float64).reshape(-1, 1)
    per_head = torch.cat([g.pow(alpha).expand(-1, qk_nope_head_dim), g.expand(-1, qk_rope_head_dim)], dim=1)
    return per_head.reshape(-1).to(dtype)


def mla_kv_up_row_scales(gamma: torch.Tensor, *, qk_nope_head_dim: int, v_head_dim: int, alpha: float = 0.5,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row factors ``[heads * (qk_nope + v_head)]`` for MLA's ``linear_kv_up_proj``: per head
    ``gamma ** (1 - alpha)`` on the content key rows ``k^C``, 1 on the value rows."""
    validate_qk_clip(1.0, alpha)
    _mla_dims(qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim)
    g = gamma.to(torch.float64).reshape(-1, 1)
    per_head = torch.cat([g.pow(1.0 - alpha).expand(-1, qk_nope_head_dim), torch.ones_like(g).expand(-1, v_head_dim)],
                         dim=1)
    return per_head.reshape(-1).to(dtype)


# --- application -----------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale_block_(block: torch.Tensor, factors: torch.Tensor) -> None:
    """``block [rows, cols] *= factors[:, None]``, computed in float32 (float64) and rounded once."""
    f = factors.to(device=block.device, dtype=_compute_dtype(block.dtype)).unsqueeze(1)
    if block.dtype in (torch.float32, torch.float64):
        block.mul_(f)
    else:
        block.copy_(block.to(f.dtype).mul_(f))


@torch.no_grad()
def scale_rows_(weight: torch.Tensor, row_scales: torch.Tensor, *, row_offset: int = 0) -> torch.Tensor:
    """Multiply row ``r`` of ``weight`` by ``row_scales[row_offset + r]``, in place; returns ``weight``.

    ``weight`` is the whole matrix ``[rows, ...]`` (``row_offset=0``) or the contiguous row range
    starting at ``row_offset`` of it, e.g. a tensor-parallel shard of a column-parallel projection
    (``row_offset = rank * rows_per_rank``). Equal, bitwise, to scaling the whole matrix and
    slicing. Trailing dimensions are flattened into the row."""
    rows = weight.shape[0] if weight.ndim else 0
    if weight.ndim < 1 or row_offset < 0 or row_offset + rows > row_scales.numel():
        raise ValueError(f"weight rows [{row_offset}, {row_offset + rows}) (shape {tuple(weight.shape)}) do not lie in "
                         f"the {row_scales.numel()} rows of row_scales: check row_offset and the layout's head counts")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor; got {weight.dtype}")
    view = weight.view(rows, -1) if weight.ndim != 2 else weight
    _scale_block_(view, row_scales[row_offset : row_offset + rows])
    return weight


@torch.no_grad()
def scale_flat_range_(flat: torch.Tensor, row_scales: torch.Tensor, *, row_length: int, start: int) -> torch.Tensor:
    """Scale an element range of a row-major flattened matrix in place; returns ``flat``.

    ``flat`` (1-D) holds elements ``[start, start + flat.numel())`` of the matrix flattened row by
    row, rows of ``row_length`` elements (a ZeRO-1 partition or a distributed-optimizer shard,
    which may begin and end mid-row). Element ``e`` is multiplied by
    ``row_scales[e // row_length]``. Equal, bitwise, to scaling the whole matrix and slicing."""
    if flat.ndim != 1:
        raise ValueError(f"flat must be 1-D; got shape {tuple(flat.shape)}")
    if row_length < 1:
        raise ValueError(f"row_length must be >= 1; got {row_length}")
    end = start + flat.numel()
    if start < 0 or end > row_scales.numel() * row_length:
        raise ValueError(f"flat range [{start}, {end}) lies outside the matrix of {row_scales.numel()} rows x "
                         f"{row_length}: check start and row_length")
    if flat.numel() == 0:
        return flat
    pos = 0
    first_row, col = divmod(start, row_length)
    if col:  # the tail of a row the range begins inside
        n = min(row_length - col, flat.numel())
        _scale_block_(flat[:n].view(1, n), row_scales[first_row : first_row + 1])
        pos, first_row = n, first_row + 1
    whole = (flat.numel() - pos) // row_length
    if whole:
        _scale_block_(flat[pos : pos + whole * row_length].view(whole, row_length),
                      row_scales[first_row : first_row + whole])
        pos, first_row = pos + whole * row_length, first_row + whole
    if pos < flat.numel():  # the head of the row the range ends inside
        n = flat.numel() - pos
        _scale_block_(flat[pos:].view(1, n), row_scales[first_row : first_row + 1])
    return flat


@torch.no_grad()
def clip_fused_qkv_(weight: torch.Tensor, max_logits: torch.Tensor, *, tau: float, num_query_groups: int,
                    head_dim: int, alpha: float = 0.5, gqa_rule: str = "per_head") -> torch.Tensor | None:
    """QK-Clip a whole fused QKV weight in place from its heads' max logits; returns gamma
    (``[heads]``, float64) or ``None`` when no head exceeded ``tau`` (the weight is untouched)."""
    gamma = clip_factors(max_logits, tau)
    if gamma is not None:
        scales = fused_qkv_row_scales(gamma, num_query_groups=num_query_groups, head_dim=head_dim, alpha=alpha,
                                      gqa_rule=gqa_rule, dtype=_compute_dtype(weight.dtype))
        scale_rows_(weight, scales)
    return gamma


@torch.no_grad()
def clip_mla_(q_weight: torch.Tensor, kv_up_weight: torch.Tensor, max_logits: torch.Tensor, *, tau: float,
              qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
              alpha: float = 0.5) -> torch.Tensor | None:
    """QK-Clip one MLA layer in place: ``q_weight`` is ``linear_q_proj`` (or ``linear_q_up_proj``),
    ``kv_up_weight`` is ``linear_kv_up_proj``; ``linear_kv_down_proj`` (holding the shared rotary
    key) is never touched. Returns gamma (``[heads]``, float64) or ``None`` when no head exceeded
    ``tau`` (nothing is touched)."""
    gamma = clip_factors(max_logits, tau)
    if gamma is not None:
        scale_rows_(q_weight, mla_q_row_scales(gamma, qk_nope_head_dim=qk_nope_head_dim,
                                               qk_rope_head_dim=qk_rope_head_dim, alpha=alpha,
                                               dtype=_compute_dtype(q_weight.dtype)))
        scale_rows_(kv_up_weight, mla_kv_up_row_scales(gamma, qk_nope_head_dim=qk_nope_head_dim,
                                                       v_head_dim=v_head_dim, alpha=alpha,
                                                       dtype=_compute_dtype(kv_up_weight.dtype)))
    return gamma


@dataclass(frozen=True)
class QKClipStats:
    """Telemetry of one QK-Clip step: per layer (by recorder name) the largest max logit over its
    heads, measured before clipping, and the number of heads clipped."""

    tau: float
    max_logit: dict[str, float] = field(default_factory=dict)
    clipped_heads: dict[str, int] = field(default_factory=dict)

    @property
    def max_logit_overall(self) -> float:
        """The largest max logit over all layers (``-inf`` when no layer reported)."""
        return max(self.max_logit.values(), default=-math.inf)

    @property
    def clipped_heads_total(self) -> int:
        return sum(self.clipped_heads.values())


# --- measuring -------------------------------------------------------------------------------------


@torch.no_grad()
def per_head_max_logits(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool = True,
                        max_chunk_elements: int = 1 << 24, masked_out: torch.Tensor | None = None) -> torch.Tensor:
    """The largest logit ``q_i . k_j * scale`` of each query head, over batch and positions.

    ``q`` is ``[batch, heads, s_q, d]``, ``k`` is ``[batch, groups, s_k, d]`` with ``groups``
    dividing ``heads`` (GQA: query head ``h`` uses key head ``h // (heads // groups)``). With
    ``causal`` the mask is top-left aligned, as ``scaled_dot_product_attention(is_causal=True)``:
    query ``i`` sees keys ``j <= i``. ``masked_out`` (optional, boolean, True where attention is
    not allowed, Megatron's convention) of shape ``[batch or 1, heads or 1, s_q or 1, s_k]`` excludes
    more logits (on top of ``causal`` when both are given). Returns ``[heads]`` float32 on ``q``'s
    device, computed in float32 a chunk of query positions at a time, so no more than about
    ``max_chunk_elements`` logits exist at once; no autograd graph is recorded. A head every one of
    whose logits is excluded gets ``-inf``."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [batch, heads, s_q, d] and k [batch, groups, s_k, d] with the same batch and d; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    b, heads, s_q, d = q.shape
    groups, s_k = k.shape[1], k.shape[2]
    if groups < 1 or heads % groups:
        raise ValueError(f"k's {groups} heads must divide q's {heads} heads (GQA)")
    rep = heads // groups
    if masked_out is not None:
        m = masked_out.shape
        if masked_out.ndim != 4 or m[0] not in (1, b) or m[1] not in (1, heads) or m[2] not in (1, s_q) or m[3] != s_k:
            raise ValueError(f"masked_out must be [batch or 1, heads or 1, s_q or 1, s_k] = [{b} or 1, {heads} or 1, "
                             f"{s_q} or 1, {s_k}]; got {tuple(m)}")
        masked_out = masked_out.to(device=q.device, dtype=torch.bool)
    chunk = max(1, min(s_q, max_chunk_elements // max(1, b * heads * s_k)))
    kf = k.detach().to(torch.float32).unsqueeze(2)  # [b, groups, 1, s_k, d]
    best = torch.full((heads,), -math.inf, dtype=torch.float32, device=q.device)
    for i0 in range(0, s_q, chunk):
        i1 = min(s_q, i0 + chunk)
        qc = q.detach()[:, :, i0:i1].to(torch.float32).view(b, groups, rep, i1 - i0, d)
        logits = torch.matmul(qc, kf.transpose(-1, -2)).mul_(scale)  # [b, groups, rep, c, s_k]
        if causal:
            rows = torch.arange(i0, i1, device=q.device).unsqueeze(1)
            cols = torch.arange(s_k, device=q.device).unsqueeze(0)
            logits.masked_fill_(cols > rows, -math.inf)
        if masked_out is not None:
            mc = masked_out[:, :, i0:i1] if masked_out.shape[2] > 1 else masked_out  # [b|1, heads|1, c|1, s_k]
            mc = mc.reshape(mc.shape[0], groups, rep, mc.shape[2], s_k) if mc.shape[1] == heads else mc.unsqueeze(2)
            logits.masked_fill_(mc, -math.inf)
        best = torch.maximum(best, logits.amax(dim=(0, 3, 4)).reshape(heads))
    return best


_ACTIVE: contextvars.ContextVar[MaxLogitRecorder | None] = contextvars.ContextVar(
    "muon_megatron_max_logit_recorder", default=None)


def active_recorder() -> MaxLogitRecorder | None:
    """The recorder of the innermost ``with recorder:`` block, or ``None`` outside any (then
    attention code skips measuring entirely)."""
    return _ACTIVE.get()


class MaxLogitRecorder:
    """Per-head max logits of named attention layers, kept as a running max until consumed.

    Attention modules call :meth:`record` with their per-head max (``[heads]``) or
    :meth:`record_logits` with their q and k, under a name unique in the model (for this project's
    models, the attention module's qualified name). Each call folds into the running max of that
    name, so a step's micro-batches accumulate (and a forward pass recomputed for activation
    checkpointing records the same values again, which changes nothing); :meth:`reset` (or
    :meth:`consume`) starts the next step. ``with recorder:`` makes it the :func:`active_recorder`
    of the block (nestable; the previous one returns on exit).

    Cross-rank reduction: :meth:`pack` concatenates every layer's maxima (names sorted, float32)
    into one flat tensor; an adapter all-reduces it with MAX over the data- and context-parallel
    ranks and writes it back with :meth:`unpack_`. Maxima stay on the device they were recorded
    on; nothing here synchronises with it."""

    def __init__(self) -> None:
        self._maxima: dict[str, torch.Tensor] = {}
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> MaxLogitRecorder:
        self._tokens.append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._tokens.pop())

    @torch.no_grad()
    def record(self, name: str, per_head_max: torch.Tensor) -> None:
        """Fold ``per_head_max`` (``[heads]``) into the running max of ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"record: name must be a non-empty string; got {name!r}")
        value = per_head_max.detach().to(torch.float32).reshape(-1)
        if per_head_max.ndim != 1 or value.numel() == 0:
            raise ValueError(f"record({name!r}): per_head_max must be a non-empty 1-D tensor [heads]; "
                             f"got shape {tuple(per_head_max.shape)}")
        old = self._maxima.get(name)
        if old is None:
            self._maxima[name] = value.clone()
        elif old.shape != value.shape:
            raise ValueError(f"record({name!r}): {value.numel()} heads, but {old.numel()} were recorded under this "
                             "name before; give each attention layer its own name")
        else:
            torch.maximum(old, value.to(old.device), out=old)

    def record_logits(self, name: str, q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool = True,
                      max_chunk_elements: int = 1 << 24, masked_out: torch.Tensor | None = None) -> None:
        """:meth:`record` the per-head max of ``q . k * scale`` (see :func:`per_head_max_logits`)."""
        self.record(name, per_head_max_logits(q, k, scale=scale, causal=causal, max_chunk_elements=max_chunk_elements,
                                              masked_out=masked_out))

    @property
    def maxima(self) -> Mapping[str, torch.Tensor]:
        """The running maxima by name (a new dict of the live ``[heads]`` float32 tensors)."""
        return dict(self._maxima)

    def get(self, name: str) -> torch.Tensor | None:
        return self._maxima.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._maxima

    def __len__(self) -> int:
        return len(self._maxima)

    def names(self) -> list[str]:
        """Recorded names, sorted: the order of :meth:`pack`."""
        return sorted(self._maxima)

    def reset(self) -> None:
        """Forget all maxima (after the optimizer has used them)."""
        self._maxima.clear()

    def consume(self) -> dict[str, torch.Tensor]:
        """The maxima, then :meth:`reset`."""
        out, self._maxima = self._maxima, {}
        return out

    def pack(self, names: Iterable[str] | None = None) -> torch.Tensor:
        """One flat float32 tensor of the maxima of ``names`` (default: every recorded name),
        sorted by name. Passing the names every rank expects turns a layer one rank did not
        record into a clear error instead of a mismatched all-reduce."""
        order = sorted(self._maxima if names is None else names)
        missing = [n for n in order if n not in self._maxima]
        if missing:
            raise KeyError(f"no max logits recorded for {missing}: run their forward passes inside `with recorder:`")
        if not order:
            raise ValueError("nothing recorded to pack")
        return torch.cat([self._maxima[n] for n in order])

    @torch.no_grad()
    def unpack_(self, flat: torch.Tensor, names: Iterable[str] | None = None) -> None:
        """Write ``flat`` (from :meth:`pack` with the same ``names``, e.g. after an all-reduce)
        back into the maxima."""
        order = sorted(self._maxima if names is None else names)
        sizes = [self._maxima[n].numel() for n in order]
        if flat.ndim != 1 or flat.numel() != sum(sizes):
            raise ValueError(f"unpack_: flat has shape {tuple(flat.shape)}, the recorded layers {sum(sizes)} maxima "
                             "in all; pack and unpack the same names")
        for n, part in zip(order, torch.split(flat, sizes)):
            self._maxima[n].copy_(part)


def layer_stats(tau: float, maxima: Mapping[str, torch.Tensor],
                gammas: Mapping[str, torch.Tensor | None]) -> QKClipStats:
    """:class:`QKClipStats` from each layer's maxima and its gamma (``None``: nothing clipped).
    One host transfer for all layers."""
    names = list(maxima)
    if not names:
        return QKClipStats(tau=tau)
    stacked = torch.stack([maxima[n].detach().to(torch.float64).amax() for n in names])
    clipped = torch.stack([
        torch.zeros((), dtype=torch.float64, device=stacked.device) if gammas.get(n) is None
        else (gammas[n] < 1).sum().to(device=stacked.device, dtype=torch.float64)
        for n in names
    ])
    values = torch.stack([stacked, clipped]).tolist()
    return QKClipStats(tau=tau, max_logit=dict(zip(names, values[0])),
                       clipped_heads={n: int(c) for n, c in zip(names, values[1])})


# --- declaring where a layer's queries and keys live -----------------------------------------------

#: :attr:`QKClipLayer.layout` values.
QK_CLIP_LAYOUTS = ("separate", "fused_qkv", "mla")


def _positive_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class QKClipLayer:
    """Where one attention layer's query and key rows live, for an engine adapter that clips them.

    A model lists one per attention layer (e.g. from a ``qk_clip_layers()`` method); parameter
    names are those of ``model.named_parameters()``. Three layouts (see the module docstring for
    the row order each implies):

    - ``"separate"``: ``q`` is the query projection weight ``[num_heads * head_dim, hidden]``,
      ``k`` the key projection weight ``[num_query_groups * head_dim, hidden]`` (Llama-style;
      ``num_query_groups < num_heads`` is GQA).
    - ``"fused_qkv"``: ``qkv`` is megatron-core's fused weight
      ``[num_query_groups * (num_heads / num_query_groups + 2) * head_dim, hidden]``.
    - ``"mla"``: ``q`` is ``linear_q_proj`` (or ``linear_q_up_proj``)
      ``[num_heads * (qk_nope_head_dim + qk_rope_head_dim), ...]``, ``k`` is ``linear_kv_up_proj``
      ``[num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]``.

    ``name`` is the key under which the layer's attention records its per-head max logits into
    the active :class:`MaxLogitRecorder` (``[num_heads]``). Only the weights' rows are described:
    a bias of q or k (if any) is not scaled, and weights behind a q/k normalisation must not be
    declared (the norm would undo the scale)."""

    name: str
    """Recorder name of the layer (unique in the model)."""
    layout: str
    """One of :data:`QK_CLIP_LAYOUTS`."""
    num_heads: int
    """Query heads of the layer (the length of its recorded max-logit vector)."""
    q: str | None = None
    """``"separate"``: the query projection weight; ``"mla"``: ``linear_q_proj`` / ``linear_q_up_proj``."""
    k: str | None = None
    """``"separate"``: the key projection weight; ``"mla"``: ``linear_kv_up_proj``."""
    qkv: str | None = None
    """``"fused_qkv"``: the fused query/key/value weight."""
    num_query_groups: int | None = None
    """Key heads (``"separate"``, ``"fused_qkv"``); default ``num_heads`` (MHA)."""
    head_dim: int | None = None
    """Rows per query or key head (``"separate"``, ``"fused_qkv"``)."""
    qk_nope_head_dim: int | None = None
    """MLA: rows of a head's content part (``q^C``, ``k^C``)."""
    qk_rope_head_dim: int | None = None
    """MLA: rows of a head's rotary query part ``q^R``."""
    v_head_dim: int | None = None
    """MLA: value rows per head in ``linear_kv_up_proj``."""

    def __post_init__(self):
        where = f"QKClipLayer {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"QKClipLayer.name must be a non-empty string (the recorder name); got {self.name!r}")
        if self.layout not in QK_CLIP_LAYOUTS:
            raise ValueError(f"{where}: layout must be one of {QK_CLIP_LAYOUTS}; got {self.layout!r}")
        _positive_int(self.num_heads, f"{where}: num_heads")
        wanted = {"separate": ("q", "k", "head_dim"), "fused_qkv": ("qkv", "head_dim"),
                  "mla": ("q", "k", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}[self.layout]
        unused = {"separate": ("qkv", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
                  "fused_qkv": ("q", "k", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
                  "mla": ("qkv", "head_dim", "num_query_groups")}[self.layout]
        missing = [f for f in wanted if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{where}: layout {self.layout!r} needs {', '.join(missing)}")
        extra = [f for f in unused if getattr(self, f) is not None]
        if extra:
            raise ValueError(f"{where}: {', '.join(extra)} do not apply to layout {self.layout!r}")
        for f in ("q", "k", "qkv"):
            value = getattr(self, f)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{where}: {f} must be a parameter name; got {value!r}")
        if self.layout == "mla":
            _positive_int(self.qk_nope_head_dim, f"{where}: qk_nope_head_dim")
            _mla_dims(qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim)
        else:
            _positive_int(self.head_dim, f"{where}: head_dim")
            if self.num_query_groups is None:
                object.__setattr__(self, "num_query_groups", self.num_heads)
            _positive_int(self.num_query_groups, f"{where}: num_query_groups")
            if self.num_heads % self.num_query_groups:
                raise ValueError(f"{where}: num_query_groups={self.num_query_groups} must divide "
                                 f"num_heads={self.num_heads}")

    @property
    def params(self) -> tuple[str, ...]:
        """The parameter names QK-Clip scales: ``(q, k)`` or ``(qkv,)``."""
        return (self.qkv,) if self.layout == "fused_qkv" else (self.q, self.k)

    def rows(self) -> dict[str, int]:
        """The number of rows (dimension 0) each parameter of :attr:`params` must have."""
        H = self.num_heads
        if self.layout == "mla":
            return {self.q: H * (self.qk_nope_head_dim + self.qk_rope_head_dim),
                    self.k: H * (self.qk_nope_head_dim + self.v_head_dim)}
        G, d = self.num_query_groups, self.head_dim
        if self.layout == "separate":
            return {self.q: H * d, self.k: G * d}
        return {self.qkv: (H + 2 * G) * d}

    def row_scales(self, gamma: torch.Tensor, *, alpha: float = 0.5, gqa_rule: str = "per_head",
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Per parameter of :attr:`params`, its row factors (over all its rows) for the per-head
        ``gamma`` (``[num_heads]``, from :func:`clip_factors`). ``gqa_rule`` applies to GQA layers
        of the "separate" and "fused_qkv" layouts."""
        if gamma.ndim != 1 or gamma.numel() != self.num_heads:
            raise ValueError(f"QKClipLayer {self.name!r}: gamma has shape {tuple(gamma.shape)}, the layer "
                             f"{self.num_heads} heads")
        if self.layout == "mla":
            return {
                self.q: mla_q_row_scales(gamma, qk_nope_head_dim=self.qk_nope_head_dim,
                                         qk_rope_head_dim=self.qk_rope_head_dim, alpha=alpha, dtype=dtype),
                self.k: mla_kv_up_row_scales(gamma, qk_nope_head_dim=self.qk_nope_head_dim,
                                             v_head_dim=self.v_head_dim, alpha=alpha, dtype=dtype),
            }
        kw = dict(num_query_groups=self.num_query_groups, head_dim=self.head_dim, alpha=alpha, dtype=dtype)
        if self.layout == "separate":
            return {self.q: q_row_scales(gamma, gqa_rule=gqa_rule, **kw), self.k: k_row_scales(gamma, **kw)}
        return {self.qkv: fused_qkv_row_scales(gamma, gqa_rule=gqa_rule, **kw)}
