"""A plain-torch Moonlight-family model built from a :class:`~.spec.ModelSpec` (no engine).

For benchmarks and single-process runs: MLA attention (``q_lora_rank=None`` or set), RoPE on the
shared rotary key, RMSNorm, SwiGLU, the first layers dense, then MoE layers with shared experts
and a sigmoid router whose per-expert bias steers selection only (aux-loss-free balancing,
updated by :meth:`MoonlightModel.update_expert_bias_` after each optimizer step). Routed experts
are 3-D parameters ``[E, out, in]`` so that Muon's default split orthogonalises each expert on its
own. Parameter names follow Megatron's where they exist (``embedding``, ``output_layer``), so
Moonlight's routing rule sends embeddings and head to AdamW.

Not a reproduction of Megatron numerics: a small, readable reference of the same architecture.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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
    """Multi-head latent attention, as in DeepSeek-V2/V3 and Moonlight."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        a, h = spec.attention, spec.hidden
        self.a = a
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
        self.self_attention = MLA(spec)
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
