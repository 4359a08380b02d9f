"""Pure-data descriptions of Moonlight-family models (DeepseekV3 architecture, MLA + MoE).

A :class:`ModelSpec` holds the architecture; :func:`weights` lists every trainable weight as a
:class:`Weight`, named as megatron-core's ``GPTModel`` names it, with the split spec that says
which logical matrices it holds, how tensor parallelism cuts it and how many of its logical
matrices each token uses. Parameter counts, the sizing (``muon-megatron plan``) and the Megatron config builder all read
this one list. Imports torch only through :mod:`muon_megatron.core`.

Conventions (megatron-core ``GPTModel`` with a local or Transformer Engine layer spec):

- Weights are ``[out_features, in_features]``. ``tp_dim`` 0 is column-parallel (rows cut over
  tensor parallelism), 1 is row-parallel, ``None`` is replicated over TP.
- MLA with ``q_lora_rank=None``: ``linear_q_proj`` ``[H * (nope + rope), hidden]``,
  ``linear_kv_down_proj`` ``[kv_lora + rope, hidden]``, ``kv_layernorm`` ``[kv_lora]``,
  ``linear_kv_up_proj`` ``[H * (nope + v), kv_lora]``, ``linear_proj`` ``[hidden, H * v]``.
- MLPs fuse gate and up into ``linear_fc1`` ``[2 * ffn, hidden]`` (split back by
  :class:`~muon_megatron.core.GateUp`, as Moonlight's separate ``gate_proj``/``up_proj``).
- The routed experts of one layer are described as one stack per projection,
  ``mlp.experts.linear_fc1`` ``[E, 2 * ffn, hidden]`` and ``mlp.experts.linear_fc2``
  ``[E, hidden, ffn]`` (:class:`~muon_megatron.core.ExpertStack`, every expert its own matrix).
  Megatron stores them per expert (``weight0..`` or ``local_experts.i``); the logical matrices
  are the same. Expert stacks are cut over expert parallelism (``expert=True``).
- Shared experts are one MLP of ``num_shared_experts * expert_ffn`` (Megatron's
  ``moe_shared_expert_intermediate_size``), which is mathematically the sum of the shared experts.
  Moonlight's checkpoint also stores them fused (``shared_experts.gate_proj`` of 2816 rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..core.splits import ExpertStack, GateUp, SplitSpec, Whole


@dataclass(frozen=True, kw_only=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3, as in Moonlight)."""

    num_heads: int
    """Attention heads (H)."""
    kv_lora_rank: int
    """Width of the compressed key/value latent."""
    qk_nope_head_dim: int
    """Per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int
    """Per-head rotary width (the rotary key part is shared by all heads)."""
    v_head_dim: int
    """Per-head value width."""
    q_lora_rank: Optional[int] = None
    """Width of the compressed query; None (Moonlight) projects queries directly."""

    def __post_init__(self):
        for field in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"MLASpec.{field} must be >= 1, got {getattr(self, field)}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"MLASpec.q_lora_rank must be None or >= 1, got {self.q_lora_rank}")


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    """Mixture of experts with shared experts and an aux-loss-free sigmoid router."""

    num_experts: int
    """Routed experts per MoE layer."""
    expert_ffn: int
    """Intermediate width of one routed expert."""
    top_k: int
    """Routed experts used per token."""
    num_shared_experts: int = 0
    """Shared experts (always active), each of width ``expert_ffn``."""
    score_function: str = "sigmoid"
    """Router score: "sigmoid" (Moonlight) or "softmax"."""
    expert_bias: bool = True
    """Aux-loss-free load balancing: a per-expert bias added to the scores for selection only."""
    bias_update_rate: float = 1e-3
    """Step of the expert-bias update (Moonlight: 1e-3, 0 in the final stage)."""
    routed_scaling_factor: float = 1.0
    """Scale of the routed experts' combined output (Moonlight: 2.446)."""

    def __post_init__(self):
        if self.num_experts < 1 or self.expert_ffn < 1:
            raise ValueError(f"MoESpec needs num_experts and expert_ffn >= 1, got {self}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoESpec.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoESpec.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.score_function not in ("sigmoid", "softmax"):
            raise ValueError(f"MoESpec.score_function must be 'sigmoid' or 'softmax', got {self.score_function!r}")

    @property
    def shared_ffn(self) -> int:
        """Width of the fused shared-expert MLP (Megatron's moe_shared_expert_intermediate_size)."""
        return self.num_shared_experts * self.expert_ffn


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A decoder-only Moonlight-family model: MLA attention, SwiGLU FFNs, the first
    ``first_dense_layers`` layers dense and the rest MoE, RMSNorm, RoPE, untied embeddings."""

    name: str
    """Registry name, e.g. "moonlight-16b-a3b"."""
    num_layers: int
    """Transformer layers."""
    hidden: int
    """Model width."""
    dense_ffn: int
    """Intermediate width of the dense layers' SwiGLU."""
    vocab_size: int
    """Vocabulary size (embedding and output rows)."""
    attention: MLASpec
    """The attention block."""
    moe: Optional[MoESpec] = None
    """The MoE block; None makes every layer dense."""
    first_dense_layers: int = 1
    """Leading layers that use a dense FFN instead of MoE (Moonlight: 1)."""
    seq_length: int = 8192
    """Training context length."""
    rope_base: float = 50000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (Moonlight: False)."""

    def __post_init__(self):
        for field in ("num_layers", "hidden", "dense_ffn", "vocab_size", "seq_length"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelSpec.{field} must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            raise ValueError(
                f"ModelSpec.first_dense_layers must be in [0, num_layers={self.num_layers}], "
                f"got {self.first_dense_layers}"
            )

    def replace(self, **changes) -> "ModelSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.first_dense_layers

    @property
    def moe_layer_pattern(self) -> list[int]:
        """Megatron's ``moe_layer_freq`` list: 1 for an MoE layer, 0 for a dense one."""
        return [int(self.is_moe_layer(i)) for i in range(self.num_layers)]


@dataclass(frozen=True)
class Weight:
    """One trainable tensor of the model.

    ``split`` gives its logical matrices (``split.matrices(shape)``); ``use_muon`` says whether
    Moonlight's routing rule sends it to Muon; ``tp_dim`` how tensor parallelism cuts the full
    tensor (0 rows, 1 columns, None replicated; for an expert stack, the dims of each expert);
    ``expert`` whether expert parallelism cuts it (routed experts); ``active_fraction`` the share
    of its logical matrices (and parameters) a token uses; ``layer`` the transformer layer or
    None for embeddings, output and the final norm.
    """

    name: str
    shape: tuple[int, ...]
    split: Optional[SplitSpec]
    use_muon: bool
    tp_dim: Optional[int]
    expert: bool = False
    active_fraction: float = 1.0
    layer: Optional[int] = None
    kind: str = "matrix"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def active_numel(self) -> float:
        return self.numel * self.active_fraction

    def matrices(self):
        """The logical matrices Muon orthogonalises (empty for an AdamW weight)."""
        return self.split.matrices(self.shape) if self.use_muon else ()


def _layer_weights(spec: ModelSpec, i: int) -> list[Weight]:
    a, h = spec.attention, spec.hidden
    p = f"decoder.layers.{i}"
    H, nope, rope, v = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    out = [Weight(f"{p}.input_layernorm.weight", (h,), None, False, None, layer=i, kind="norm")]
    if a.q_lora_rank is None:
        out.append(Weight(f"{p}.self_attention.linear_q_proj.weight", (H * (nope + rope), h), Whole(), True, 0, layer=i))
    else:
        out += [
            Weight(f"{p}.self_attention.linear_q_down_proj.weight", (a.q_lora_rank, h), Whole(), True, None, layer=i),
            Weight(f"{p}.self_attention.q_layernorm.weight", (a.q_lora_rank,), None, False, None, layer=i, kind="norm"),
            Weight(f"{p}.self_attention.linear_q_up_proj.weight", (H * (nope + rope), a.q_lora_rank), Whole(), True, 0,
                   layer=i),
        ]
    out += [
        # Replicated under TP with Transformer Engine (parallel_mode="duplicated").
        Weight(f"{p}.self_attention.linear_kv_down_proj.weight", (a.kv_lora_rank + rope, h), Whole(), True, None,
               layer=i),
        Weight(f"{p}.self_attention.kv_layernorm.weight", (a.kv_lora_rank,), None, False, None, layer=i, kind="norm"),
        Weight(f"{p}.self_attention.linear_kv_up_proj.weight", (H * (nope + v), a.kv_lora_rank), Whole(), True, 0,
               layer=i),
        Weight(f"{p}.self_attention.linear_proj.weight", (h, H * v), Whole(), True, 1, layer=i),
        Weight(f"{p}.pre_mlp_layernorm.weight", (h,), None, False, None, layer=i, kind="norm"),
    ]
    if not spec.is_moe_layer(i):
        f = spec.dense_ffn
        out += [
            Weight(f"{p}.mlp.linear_fc1.weight", (2 * f, h), GateUp(), True, 0, layer=i),
            Weight(f"{p}.mlp.linear_fc2.weight", (h, f), Whole(), True, 1, layer=i),
        ]
        return out
    m = spec.moe
    E, f = m.num_experts, m.expert_ffn
    share = m.top_k / E
    out += [
        # Moonlight puts the router on Muon (paper section 2.2); it is replicated under TP.
        Weight(f"{p}.mlp.router.weight", (E, h), Whole(), True, None, layer=i, kind="router"),
        Weight(f"{p}.mlp.experts.linear_fc1", (E, 2 * f, h), ExpertStack(E, inner=GateUp()), True, 0, True, share,
               layer=i, kind="expert"),
        Weight(f"{p}.mlp.experts.linear_fc2", (E, h, f), ExpertStack(E), True, 1, True, share, layer=i, kind="expert"),
    ]
    if m.num_shared_experts:
        s = m.shared_ffn
        out += [
            Weight(f"{p}.mlp.shared_experts.linear_fc1.weight", (2 * s, h), GateUp(), True, 0, layer=i),
            Weight(f"{p}.mlp.shared_experts.linear_fc2.weight", (h, s), Whole(), True, 1, layer=i),
        ]
    return out


def weights(spec: ModelSpec) -> list[Weight]:
    """Every trainable weight of ``spec``, in Megatron's module order."""
    out = [Weight("embedding.word_embeddings.weight", (spec.vocab_size, spec.hidden), None, False, 0,
                  active_fraction=1.0, kind="embedding")]
    for i in range(spec.num_layers):
        out += _layer_weights(spec, i)
    out.append(Weight("decoder.final_layernorm.weight", (spec.hidden,), None, False, None, kind="norm"))
    if not spec.tie_embeddings:
        out.append(Weight("output_layer.weight", (spec.vocab_size, spec.hidden), None, False, 0, kind="head"))
    return out


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model. ``matrix_*`` count the Muon matrices only (no embeddings,
    head or norms), the figure Moonlight quotes as 15.29 B / 2.24 B."""

    total: int
    active: int
    matrix_total: int
    matrix_active: int
    embedding: int
    muon: int
    adamw: int


def count_params(spec: ModelSpec) -> ParamCounts:
    """Count ``spec``'s parameters; ``active`` counts what one token uses (top-k of the routed
    experts, everything else whole, both embeddings included)."""
    ws = weights(spec)
    total = sum(w.numel for w in ws)
    active = round(sum(w.active_numel for w in ws))
    matrix = [w for w in ws if w.use_muon]
    emb = sum(w.numel for w in ws if w.kind in ("embedding", "head"))
    return ParamCounts(
        total=total,
        active=active,
        matrix_total=sum(w.numel for w in matrix),
        matrix_active=round(sum(w.active_numel for w in matrix)),
        embedding=emb,
        muon=sum(w.numel for w in matrix),
        adamw=sum(w.numel for w in ws if not w.use_muon),
    )
