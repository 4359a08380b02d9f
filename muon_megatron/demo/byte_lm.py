"""``--model byte-lm``: a small causal byte-level transformer in plain PyTorch.

Its attention has a fused QKV weight in Megatron's layout (per head ``[q, k, v]`` rows) and its
MLP a fused SwiGLU ``gate|up`` weight, so Muon must split both back into their parts
(:class:`~muon_megatron.FusedQKV`, :class:`~muon_megatron.GateUp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import FusedQKV, GateUp, Muon, muon_param_groups


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    seq_len: int = 128


class Block(torch.nn.Module):
    """Pre-norm block: causal attention with a fused QKV weight in Megatron's layout (per head
    [q, k, v] rows) and a SwiGLU MLP with a fused ``gate|up`` weight."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.d_model // cfg.heads
        ffn = 4 * cfg.d_model * 2 // 3
        self.attn_norm = torch.nn.RMSNorm(cfg.d_model)
        self.qkv = torch.nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = torch.nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.mlp_norm = torch.nn.RMSNorm(cfg.d_model)
        self.fc1 = torch.nn.Linear(cfg.d_model, 2 * ffn, bias=False)
        self.fc2 = torch.nn.Linear(ffn, cfg.d_model, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(B, T, self.heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        gate, up = self.fc1(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class ByteLM(torch.nn.Module):
    """A small causal byte-level transformer: untied embedding and head, as Moonlight's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = torch.nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = torch.nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = torch.nn.RMSNorm(cfg.d_model)
        self.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                torch.nn.init.normal_(p, std=std)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def loss(self, batch):
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def make_optimizer(name: str, model: ByteLM, lr: float, weight_decay: float,
                   ns_dtype: torch.dtype = torch.bfloat16) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    cfg = model.cfg
    splits = {
        "blocks.*.qkv.weight": FusedQKV(num_query_groups=cfg.heads, q_per_group=1, head_dim=cfg.d_model // cfg.heads),
        "blocks.*.fc1.weight": GateUp(),
    }
    # The learned positions are an embedding table too: AdamW, as the token embedding.
    groups = muon_param_groups(model, adamw=["pos"], splits=splits)
    return Muon(groups, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype)
