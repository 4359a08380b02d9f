"""A plain-torch Moonlight-family model built from a :class:`~.spec.ModelSpec` (no engine).

For benchmarks and single-process runs: MLA attention (``q_lora_rank=None`` or set), RoPE on the
shared rotary key, RMSNorm, SwiGLU, the first layers dense, then MoE layers with shared experts
and a sigmoid router whose per-expert bias steers selection only (aux-loss-free balancing,
updated by :meth:`MoonlightModel.update_expert_bias_` after each optimizer step). Routed experts
are 3-D parameters ``[E, out, in]`` so that Muon's default split orthogonalises each expert on its
own. Parameter names follow Megatron's where they exist (``embedding``, ``output_layer``), so
Moonlight's routing rule sends embeddings and head to AdamW.

QK-Clip (Kimi K2's MuonClip): inside ``with recorder:`` (a
:class:`~muon_megatron.core.qk_clip.MaxLogitRecorder`) every MLA layer records its per-head max
logit under its qualified name (``layers.<i>.self_attention``); after ``optimizer.step()``,
:func:`qk_clip_` scales the query and key weights of the heads above the threshold. Outside a
recorder the forward pass computes nothing extra and gives the same numbers. Engine adapters find the
layers' query and key weights through :meth:`MoonlightModel.qk_clip_layers`.

Not a reproduction of Megatron numerics: a small, readable reference of the same architecture.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.qk_clip import QKClipLayer, QKClipStats, active_recorder, clip_mla_, layer_stats, validate_qk_clip
from .spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def rope_tables(seq: int, dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape ``[seq, dim]`` for rotate-half RoPE."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., seq, dim]`` by the tables (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class MLA(nn.Module):
    """Multi-head latent attention, as in DeepSeek-V2/V3 and Moonlight.

    ``name`` is the key under which an active max-logit recorder receives this layer's per-head
    max logits (:class:`MoonlightModel` passes the module's qualified name)."""

    def __init__(self, spec: ModelSpec, name: str = "self_attention"):
        super().__init__()
        a, h = spec.attention, spec.hidden
        self.a = a
        self.max_logit_name = name
        q_out = a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        if a.q_lora_rank is None:
            self.linear_q_proj = nn.Linear(h, q_out, bias=False)
        else:
            self.linear_q_down_proj = nn.Linear(h, a.q_lora_rank, bias=False)
            self.q_layernorm = RMSNorm(a.q_lora_rank, spec.norm_eps)
            self.linear_q_up_proj = nn.Linear(a.q_lora_rank, q_out, bias=False)
        self.linear_kv_down_proj = nn.Linear(h, a.kv_lora_rank + a.qk_rope_head_dim, bias=False)
        self.kv_layernorm = RMSNorm(a.kv_lora_rank, spec.norm_eps)
        self.linear_kv_up_proj = nn.Linear(a.kv_lora_rank, a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.linear_proj = nn.Linear(a.num_heads * a.v_head_dim, h, bias=False)

    def forward(self, x, cos, sin):
        a = self.a
        b, s, _ = x.shape
        H, nope, rope, v = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        if a.q_lora_rank is None:
            q = self.linear_q_proj(x)
        else:
            q = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))
        q = q.view(b, s, H, nope + rope).transpose(1, 2)
        q_nope, q_rope = q.split([nope, rope], dim=-1)
        kv_a = self.linear_kv_down_proj(x)
        latent, k_rope = kv_a.split([a.kv_lora_rank, rope], dim=-1)
        kv = self.linear_kv_up_proj(self.kv_layernorm(latent)).view(b, s, H, nope + v).transpose(1, 2)
        k_nope, value = kv.split([nope, v], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).expand(b, H, s, rope)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        recorder = active_recorder()
        if recorder is not None:  # QK-Clip's measurement; outside a recorder nothing extra runs
            recorder.record_logits(self.max_logit_name, q, k, scale=1.0 / math.sqrt(nope + rope), causal=True)
        out = F.scaled_dot_product_attention(q, k, value, is_causal=True, scale=1.0 / math.sqrt(nope + rope))
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, H * v))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Routed experts (3-D weights) with a sigmoid router and selection bias, plus shared experts."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        m, h = spec.moe, spec.hidden
        self.m = m
        self.router = nn.Linear(h, m.num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(m.num_experts), persistent=True)
        self.register_buffer("load", torch.zeros(m.num_experts), persistent=False)
        std = 1.0 / math.sqrt(h)
        self.expert_gate_proj = nn.Parameter(torch.randn(m.num_experts, m.expert_ffn, h) * std)
        self.expert_up_proj = nn.Parameter(torch.randn(m.num_experts, m.expert_ffn, h) * std)
        self.expert_down_proj = nn.Parameter(torch.randn(m.num_experts, h, m.expert_ffn) / math.sqrt(m.expert_ffn))
        self.shared_experts = SwiGLU(h, m.shared_ffn) if m.num_shared_experts else None

    def forward(self, x):
        b, s, h = x.shape
        tokens = x.reshape(-1, h)
        scores = torch.sigmoid(self.router(tokens).float())
        # The bias picks experts; the unbiased scores weight them (DeepSeek-V3's aux-free rule).
        _, idx = torch.topk(scores + self.expert_bias, self.m.top_k, dim=-1)
        weights = scores.gather(-1, idx)
        weights = weights / weights.sum(-1, keepdim=True) * self.m.routed_scaling_factor
        flat = idx.reshape(-1)
        counts = torch.bincount(flat, minlength=self.m.num_experts)
        if self.training:
            self.load += counts.to(self.load.dtype)
        order = torch.argsort(flat, stable=True)
        token_of = order // self.m.top_k
        routed = tokens[token_of]
        out = torch.empty_like(routed)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                xe = routed[start : start + n]
                gate, up, down = (w[e].to(xe.dtype) for w in (self.expert_gate_proj, self.expert_up_proj,
                                                              self.expert_down_proj))
                out[start : start + n] = (F.silu(xe @ gate.t()) * (xe @ up.t())) @ down.t()
            start += n
        out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        combined = torch.zeros_like(tokens).index_add_(0, token_of, out)
        if self.shared_experts is not None:
            combined = combined + self.shared_experts(tokens)
        return combined.view(b, s, h)


class Layer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden, spec.norm_eps)
        self.self_attention = MLA(spec, name=f"layers.{index}.self_attention")
        self.pre_mlp_layernorm = RMSNorm(spec.hidden, spec.norm_eps)
        self.mlp = MoE(spec) if spec.is_moe_layer(index) else SwiGLU(spec.hidden, spec.dense_ffn)

    def forward(self, x, cos, sin):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class MoonlightModel(nn.Module):
    """``forward(ids [b, s]) -> logits [b, s, vocab]``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.tie_embeddings:
            raise ValueError("MoonlightModel builds untied embeddings only (Moonlight's choice)")
        self.spec = spec
        self.embedding = nn.Embedding(spec.vocab_size, spec.hidden)
        self.layers = nn.ModuleList(Layer(spec, i) for i in range(spec.num_layers))
        self.final_layernorm = RMSNorm(spec.hidden, spec.norm_eps)
        self.output_layer = nn.Linear(spec.hidden, spec.vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=1.0)
        self._rope = None

    def forward(self, ids):
        s = ids.shape[1]
        rope_dim = self.spec.attention.qk_rope_head_dim
        if self._rope is None or self._rope[0].shape[0] < s or self._rope[0].device != ids.device:
            self._rope = rope_tables(max(s, self.spec.seq_length), rope_dim, self.spec.rope_base, ids.device)
        cos, sin = self._rope[0][:s], self._rope[1][:s]
        x = self.embedding(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output_layer(self.final_layernorm(x))

    def qk_clip_layers(self) -> list[QKClipLayer]:
        """Where each MLA layer's queries and keys live (parameter names relative to this model),
        for engine adapters that apply QK-Clip (e.g. ``muon_megatron.deepspeed.initialize`` with
        ``optimizer.params.qk_clip_threshold``): the query projection (``linear_q_proj``, or
        ``linear_q_up_proj`` with a q LoRA rank) and ``linear_kv_up_proj``, recorded under each
        layer's ``max_logit_name``."""
        out = []
        for prefix, module in self.named_modules():
            if isinstance(module, MLA):
                a = module.a
                q = "linear_q_proj" if a.q_lora_rank is None else "linear_q_up_proj"
                out.append(QKClipLayer(name=module.max_logit_name, layout="mla", num_heads=a.num_heads,
                                       q=f"{prefix}.{q}.weight", k=f"{prefix}.linear_kv_up_proj.weight",
                                       qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                                       v_head_dim=a.v_head_dim))
        return out

    @torch.no_grad()
    def update_expert_bias_(self, rate: float | None = None) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts and lower it for
        over-loaded ones by ``rate`` (default the spec's ``bias_update_rate``) times the sign of
        the load gap accumulated since the last call; then reset the counts. Mutates buffers."""
        for module in self.modules():
            if isinstance(module, MoE):
                r = module.m.bias_update_rate if rate is None else rate
                module.expert_bias += r * torch.sign(module.load.mean() - module.load)
                module.load.zero_()


def mla_layers(model_or_layers: nn.Module | Iterable[MLA]) -> list[MLA]:
    """The MLA modules of a model (in module order), or the given MLA modules."""
    if isinstance(model_or_layers, nn.Module):
        layers = [m for m in model_or_layers.modules() if isinstance(m, MLA)]
    else:
        layers = list(model_or_layers)
        bad = [type(m).__name__ for m in layers if not isinstance(m, MLA)]
        if bad:
            raise TypeError(f"qk_clip_ takes a model or MLA modules; got {bad}")
    if not layers:
        raise ValueError("qk_clip_: the model has no MLA attention layer to clip")
    return layers


@torch.no_grad()
def qk_clip_(model_or_layers: nn.Module | Iterable[MLA], recorder, *, tau: float, alpha: float = 0.5,
             reset: bool = True) -> QKClipStats:
    """QK-Clip every MLA layer of a :class:`MoonlightModel` (or the given MLA modules) in place
    from the max logits ``recorder`` collected since its last reset; call after
    ``optimizer.step()``. Per head above ``tau``: ``q^C`` rows of the query projection by
    ``gamma ** alpha``, ``q^R`` rows by ``gamma``, ``k^C`` rows of ``linear_kv_up_proj`` by
    ``gamma ** (1 - alpha)``; the shared rotary key (``linear_kv_down_proj``), values and every
    head at or below ``tau`` untouched (see :mod:`muon_megatron.core.qk_clip`). Optimizer state is
    not touched (Kimi K2's rule). Resets the recorder unless ``reset=False``.

    Returns the telemetry: per layer the max logit measured before clipping and the number of
    clipped heads. ValueError naming the layer if the recorder holds nothing for it."""
    validate_qk_clip(tau, alpha)
    layers = mla_layers(model_or_layers)
    maxima, gammas = {}, {}
    for layer in layers:
        name = layer.max_logit_name
        S = recorder.get(name)
        if S is None:
            raise ValueError(f"qk_clip_: no max logits recorded for {name!r}; run the step's forward passes inside "
                             "`with recorder:` (recorded: " + (", ".join(recorder.names()) or "nothing") + ")")
        a = layer.a
        q_weight = layer.linear_q_proj.weight if a.q_lora_rank is None else layer.linear_q_up_proj.weight
        maxima[name] = S
        gammas[name] = clip_mla_(q_weight, layer.linear_kv_up_proj.weight, S, tau=tau, alpha=alpha,
                                 qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                                 v_head_dim=a.v_head_dim)
    stats = layer_stats(tau, maxima, gammas)
    if reset:
        recorder.reset()
    return stats
