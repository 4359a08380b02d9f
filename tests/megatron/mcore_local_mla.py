"""Workers for ``test_local_mla.py``: megatron-core's MLA built from its local layer spec with
``muon_megatron.megatron.local_spec`` installed, against a float64 reference written here from the
DeepSeek-V2/V3 equations (run in spawned gloo workers, ``mcore_harness.run_world``)."""

from __future__ import annotations

import math

import torch

HEADS, NOPE, ROPE, V, KV_RANK, HIDDEN, BASE, EPS = 4, 8, 4, 6, 12, 32, 10000.0, 1e-5


def _config(q_lora_rank=None, qk_layernorm=True, **overrides):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    kw = dict(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=HEADS, kv_channels=V,
        multi_latent_attention=True, q_lora_rank=q_lora_rank, kv_lora_rank=KV_RANK, qk_head_dim=NOPE,
        qk_pos_emb_head_dim=ROPE, v_head_dim=V, qk_layernorm=qk_layernorm, rope_type="rope", rotary_base=BASE,
        apply_rope_fusion=False, normalization="RMSNorm", layernorm_epsilon=EPS, add_bias_linear=False,
        add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0, transformer_impl="local",
        use_cpu_initialization=True, params_dtype=torch.float32, persist_layer_norm=False,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False,
    )
    kw.update(overrides)
    return MLATransformerConfig(**kw)


def _attention(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=config.qk_layernorm,
                                    normalization="RMSNorm")
    return build_module(spec.submodules.self_attention, config=config, layer_number=1)


def _rms(x, gain):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * gain


def _rope(t, positions):
    """DeepSeek's RoPE as megatron-core applies it to MLA: the rotary channels, stored interleaved
    (x0, y0, x1, y1, ...), are regrouped to (x..., y...) and rotated by rotate-half."""
    inv = 1.0 / BASE ** (torch.arange(0, ROPE, 2, dtype=torch.float64) / ROPE)
    angles = torch.outer(positions.double(), inv)
    angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [s, 1, 1, ROPE]
    t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)
    rotated = torch.cat([-t[..., ROPE // 2:], t[..., :ROPE // 2]], dim=-1)
    return t * angles.cos() + rotated * angles.sin()


def reference(params: dict, x: torch.Tensor, masked: torch.Tensor, q_lora: bool, qk_layernorm: bool):
    """MLA in float64 from the layer's weights. ``x``: [s, b, hidden]; ``masked``: [b, 1, s, s],
    True where attention is not allowed."""
    W = {name: p.detach().double() for name, p in params.items()}
    x = x.double()
    s, b, _ = x.shape
    if q_lora:
        latent_q = x @ W["linear_q_down_proj.weight"].T
        if qk_layernorm:
            latent_q = _rms(latent_q, W["q_layernorm.weight"])
        q = latent_q @ W["linear_q_up_proj.weight"].T
    else:
        q = x @ W["linear_q_proj.weight"].T
    q = q.view(s, b, HEADS, NOPE + ROPE)
    compressed = x @ W["linear_kv_down_proj.weight"].T
    latent, k_rope = compressed.split([KV_RANK, ROPE], dim=-1)
    if qk_layernorm:
        latent = _rms(latent, W["kv_layernorm.weight"])
    kv = (latent @ W["linear_kv_up_proj.weight"].T).view(s, b, HEADS, NOPE + V)
    k_nope, value = kv.split([NOPE, V], dim=-1)
    positions = torch.arange(s)
    q = torch.cat([q[..., :NOPE], _rope(q[..., NOPE:], positions)], dim=-1)
    k = torch.cat([k_nope, _rope(k_rope[:, :, None, :], positions).expand(s, b, HEADS, ROPE)], dim=-1)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(NOPE + ROPE)
    scores = scores.masked_fill(masked, -math.inf)
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), value).reshape(s, b, HEADS * V)
    return out @ W["linear_proj.weight"].T


def local_mla_against_reference(rank, world_size, cases):
    """For each ``(q_lora_rank, qk_layernorm, mask_kind)`` build the layer with random weights (norm
    gains too), run it in float32 and the reference in float64; return (max abs error, max abs
    reference value, parameter names, attention class name, max abs difference between the
    reference under the case's mask and under the causal mask alone) per case."""
    from megatron.core import parallel_state as ps

    from muon_megatron.megatron.local_spec import install_local_mla, uninstall_local_mla

    ps.initialize_model_parallel(1, 1)
    install_local_mla()
    out = []
    try:
        for q_lora_rank, qk_layernorm, mask_kind in cases:
            torch.manual_seed(3)
            attention = _attention(_config(q_lora_rank, qk_layernorm))
            with torch.no_grad():
                for name, p in attention.named_parameters():
                    p.copy_(1.0 + 0.3 * torch.randn_like(p) if "layernorm" in name else 0.3 * torch.randn_like(p))
            s, b = 9, 2
            x = torch.randn(s, b, HIDDEN)
            causal = torch.ones(s, s, dtype=torch.bool).triu(1)
            masked = causal.expand(b, 1, s, s).clone()
            if mask_kind == "documents":  # sample 0 holds two documents, [0, 4) and [4, 9)
                masked[0, 0, 4:, :4] = True
            given = None if mask_kind == "none" else masked
            got, _ = attention(x, given)
            params = dict(attention.named_parameters())
            want = reference(params, x, masked, q_lora_rank is not None, qk_layernorm)
            causal_only = reference(params, x, causal.expand(b, 1, s, s), q_lora_rank is not None, qk_layernorm)
            out.append((float((got.double() - want).abs().max()), float(want.abs().max()),
                        sorted(n for n, _ in attention.named_parameters()), type(attention).__name__,
                        float((want - causal_only).abs().max())))
    finally:
        uninstall_local_mla()
    return out


def build_errors(rank, world_size):
    """What megatron-core's local spec does with MLA without the adapter, and what the adapter
    refuses; returns {case: "ExceptionType: message"}."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import gpt_layer_specs

    from muon_megatron.megatron.local_spec import install_local_mla, uninstall_local_mla

    ps.initialize_model_parallel(1, 1)
    errors = {}

    def attempt(case, config):
        try:
            _attention(config)
            errors[case] = None
        except Exception as err:  # the message is what the test checks
            errors[case] = f"{type(err).__name__}: {err}"

    original = gpt_layer_specs.get_gpt_layer_local_submodules
    attempt("megatron-core alone", _config())
    install_local_mla()
    install_local_mla()  # idempotent
    wrapped = gpt_layer_specs.get_gpt_layer_local_submodules
    attempt("context parallel", _config(context_parallel_size=2))
    attempt("tensor parallel", _config(tensor_model_parallel_size=2))
    dense = gpt_layer_specs.get_gpt_layer_local_spec(multi_latent_attention=False)
    uninstall_local_mla()
    errors["restored"] = gpt_layer_specs.get_gpt_layer_local_submodules is original and wrapped is not original
    errors["non-MLA attention"] = (dense.submodules.self_attention.module.__name__,
                                   dense.submodules.self_attention.submodules.core_attention.__name__)
    return errors
