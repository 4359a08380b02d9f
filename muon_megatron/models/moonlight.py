"""Moonlight-16B-A3B and Moonlight-mini, as :class:`~.spec.ModelSpec` data.

Moonlight-16B-A3B is rebuilt from its public configs (``../shared/MOONLIGHT.md``): 27 layers (the
first dense), hidden 2048, MLA with 16 heads, 64 routed experts of 1408 (top-6) plus 2 shared,
sigmoid router with expert bias, vocab 163840, RoPE base 50000, 8K context, untied embeddings.

Moonlight-mini keeps the family (MLA, first layer dense, MoE with shared experts and a sigmoid
router with expert bias, untied embeddings) at two sizes: ``moonlight-mini`` trains on two CPU
cores in minutes, ``moonlight-mini-gpu`` fills one GPU. Both use a byte-level vocabulary (256).

To add a model: define a ``ModelSpec`` here and add it to :data:`MODELS` under its name.
"""

from __future__ import annotations

from .spec import MLASpec, ModelSpec, MoESpec

MOONLIGHT_16B_A3B = ModelSpec(
    name="moonlight-16b-a3b",
    num_layers=27,
    hidden=2048,
    dense_ffn=11264,
    vocab_size=163840,
    attention=MLASpec(num_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
    moe=MoESpec(
        num_experts=64, expert_ffn=1408, top_k=6, num_shared_experts=2, score_function="sigmoid",
        expert_bias=True, bias_update_rate=1e-3, routed_scaling_factor=2.446,
    ),
    first_dense_layers=1,
    seq_length=8192,
    rope_base=50000.0,
    norm_eps=1e-5,
    tie_embeddings=False,
)

MOONLIGHT_MINI = ModelSpec(
    name="moonlight-mini",
    num_layers=4,
    hidden=128,
    dense_ffn=512,
    vocab_size=256,
    attention=MLASpec(num_heads=4, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    moe=MoESpec(num_experts=8, expert_ffn=96, top_k=2, num_shared_experts=2, routed_scaling_factor=2.446),
    first_dense_layers=1,
    seq_length=256,
    rope_base=50000.0,
)

MOONLIGHT_MINI_GPU = ModelSpec(
    name="moonlight-mini-gpu",
    num_layers=12,
    hidden=768,
    dense_ffn=3072,
    vocab_size=256,
    attention=MLASpec(num_heads=12, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
    moe=MoESpec(num_experts=32, expert_ffn=512, top_k=4, num_shared_experts=2, routed_scaling_factor=2.446),
    first_dense_layers=1,
    seq_length=1024,
    rope_base=50000.0,
)

MODELS: dict[str, ModelSpec] = {m.name: m for m in (MOONLIGHT_16B_A3B, MOONLIGHT_MINI, MOONLIGHT_MINI_GPU)}


def get_model(name: str) -> ModelSpec:
    """The registered model called ``name``; ValueError listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
