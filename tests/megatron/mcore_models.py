"""Tiny megatron-core models and data for the CPU tests (run inside spawned workers).

``build_gpt(spec)`` returns an fp32 GPTModel (local layer spec) for the current parallel state;
``batch(step, spec)`` returns the same global batch on every rank, and ``local_batch`` this DP
rank's slice; ``loss_of(model, tokens)`` is the mean next-token loss. All shapes are small enough
that a step takes milliseconds on two CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TinySpec:
    """What to build. Defaults: 2 layers, hidden 32, 4 heads in 2 query groups, SwiGLU FFN 48."""

    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = 2
    ffn_hidden_size: int = 48
    vocab_size: int = 64
    seq_length: int = 8
    global_batch: int = 4
    num_moe_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_grouped_gemm: bool = False
    moe_shared_expert_intermediate_size: Optional[int] = None
    multi_latent_attention: bool = False
    seed: int = 1234

    def replace(self, **kw) -> "TinySpec":
        return dataclasses.replace(self, **kw)


def transformer_config(spec: TinySpec, **parallel):
    """A TransformerConfig for ``spec``; ``parallel`` passes sizes such as tensor_model_parallel_size."""
    kw = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        ffn_hidden_size=spec.ffn_hidden_size,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        bias_activation_fusion=False,
        add_bias_linear=False,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **parallel,
    )
    if parallel.get("pipeline_model_parallel_size", 1) > 1:
        kw["pipeline_dtype"] = torch.float32
    if spec.num_moe_experts:
        kw.update(
            num_moe_experts=spec.num_moe_experts,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size or spec.ffn_hidden_size,
            moe_router_topk=2,
            moe_grouped_gemm=spec.moe_grouped_gemm,
            moe_token_dispatcher_type="alltoall",
            moe_aux_loss_coeff=0.0,
            moe_shared_expert_intermediate_size=spec.moe_shared_expert_intermediate_size,
            add_bias_linear=False,
        )
    if spec.multi_latent_attention:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        kw.update(
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_head_dim=8,
            qk_pos_emb_head_dim=4,
            v_head_dim=8,
            num_query_groups=spec.num_attention_heads,
            rope_type="rope",
        )
        return MLATransformerConfig(**kw)
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**kw)


def build_gpt(spec: TinySpec, config=None, pre_process=True, post_process=True):
    """An fp32 GPTModel with the local layer spec, seeded so every rank starts identically."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if config is None:
        from megatron.core import parallel_state as ps

        config = transformer_config(
            spec,
            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
            expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
            # megatron-core refuses MoE with TP but without sequence parallelism
            sequence_parallel=bool(spec.num_moe_experts) and ps.get_tensor_model_parallel_world_size() > 1,
        )
    torch.manual_seed(spec.seed)
    layer_spec = get_gpt_layer_local_spec(
        num_experts=spec.num_moe_experts,
        moe_grouped_gemm=spec.moe_grouped_gemm,
        multi_latent_attention=spec.multi_latent_attention,
        normalization="RMSNorm",
    )
    if spec.multi_latent_attention:
        layer_spec.submodules.self_attention.submodules.core_attention = SdpaCoreAttention
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )


def batch(step: int, spec: TinySpec) -> torch.Tensor:
    """The global batch of step ``step``: ``[global_batch, seq_length + 1]`` token ids."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, spec.vocab_size, (spec.global_batch, spec.seq_length + 1), generator=g)


def local_batch(tokens: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    if tokens.shape[0] % dp_size:
        raise ValueError(f"global batch {tokens.shape[0]} does not divide over {dp_size} DP ranks")
    per = tokens.shape[0] // dp_size
    return tokens[dp_rank * per : (dp_rank + 1) * per]


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``tokens`` under ``model`` (a GPTModel or a DDP wrapper)."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    per_token = model(inputs, position_ids, None, labels=labels)
    return per_token.float().mean()


class SdpaCoreAttention(torch.nn.Module):
    """Causal attention with torch SDPA, standing in for megatron-core's local
    ``DotProductAttention``, which does not accept MLA's distinct key/value head sizes."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type=None, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None,
                 **kwargs):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
