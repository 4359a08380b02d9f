"""Build megatron-core configs and models for a :class:`~.spec.ModelSpec`.

Imports megatron only inside functions, so ``muon_megatron.models`` stays importable without it.
Three views of the same architecture are produced here and nowhere else:

- :func:`transformer_config`: an ``MLATransformerConfig`` with the MoE settings.
- :func:`build_gpt_model`: a ``GPTModel`` (local layer spec by default), optionally on the meta
  device so that a 16 B model can be built and counted without memory.
- :func:`megatron_args`: the ``pretrain_gpt.py`` command-line flags (used by the examples; the
  inverse, :func:`muon_megatron.models.argfile.spec_from_megatron_args`, reads them back).
"""

from __future__ import annotations

import contextlib

from .spec import ModelSpec


def _require_megatron():
    try:
        import megatron.core  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building a Megatron config needs megatron-core (pip install megatron-core>=0.16)"
        ) from err


def transformer_config(spec: ModelSpec, **overrides):
    """An ``MLATransformerConfig`` describing ``spec`` (MLA, RMSNorm, SwiGLU, no biases, MoE with
    a sigmoid router, expert bias and routed scaling, first layers dense).

    ``overrides`` set any other config field (parallel sizes, ``params_dtype``, ``bf16``,
    ``use_cpu_initialization``, ...) and win over the values derived from ``spec``.
    """
    _require_megatron()
    import torch
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    a = spec.attention
    kw = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden,
        ffn_hidden_size=spec.dense_ffn,
        num_attention_heads=a.num_heads,
        # MLA has no grouped-query sharing: every head is its own group.
        num_query_groups=a.num_heads,
        kv_channels=a.v_head_dim,
        multi_latent_attention=True,
        q_lora_rank=a.q_lora_rank,
        kv_lora_rank=a.kv_lora_rank,
        qk_head_dim=a.qk_nope_head_dim,
        qk_pos_emb_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        # Moonlight's kv_a_layernorm (and q_a_layernorm when q_lora_rank is set).
        qk_layernorm=True,
        rope_type="rope",
        rotary_base=spec.rope_base,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        bias_activation_fusion=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    if spec.moe is not None:
        m = spec.moe
        kw.update(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.expert_ffn,
            moe_router_topk=m.top_k,
            moe_shared_expert_intermediate_size=m.shared_ffn or None,
            moe_layer_freq=spec.moe_layer_pattern,
            moe_router_score_function=m.score_function,
            moe_router_enable_expert_bias=m.expert_bias,
            moe_router_bias_update_rate=m.bias_update_rate,
            moe_router_topk_scaling_factor=m.routed_scaling_factor,
            moe_router_dtype="fp32",
            # Aux-loss-free balancing through the expert bias (Moonlight, DeepSeek-V3).
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="alltoall",
        )
    kw.update(overrides)
    return MLATransformerConfig(**kw)


def build_gpt_model(
    spec: ModelSpec,
    *,
    config=None,
    meta: bool = False,
    transformer_engine: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
    **config_overrides,
):
    """A megatron-core ``GPTModel`` for ``spec``.

    Needs megatron's model-parallel state initialised (``parallel_state.initialize_model_parallel``)
    like any megatron-core model. ``meta=True`` allocates every tensor on the meta device (no
    memory, no initialisation): enough to count and name parameters. ``transformer_engine`` picks
    the Transformer Engine layer spec (needs TE), else the local spec. ``config_overrides`` go to
    :func:`transformer_config` when ``config`` is not given.
    """
    _require_megatron()
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if config is None:
        if not transformer_engine and spec.attention.q_lora_rank is None and _refuses_local_kv_norm():
            # megatron-core >= 0.19 builds MLA's q/kv norms only fused into the projections,
            # which the local backend lacks; drop the kv latent norm (kv_lora_rank weights per
            # layer, 1e-6 of the model) rather than fail. Transformer Engine builds keep it.
            config_overrides.setdefault("qk_layernorm", False)
        defaults = dict(use_cpu_initialization=True, perform_initialization=not meta,
                        transformer_impl="transformer_engine" if transformer_engine else "local")
        config = transformer_config(spec, **{**defaults, **config_overrides})
    block_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=transformer_engine,
                                            normalization="RMSNorm")
    if not transformer_engine:
        _adapt_local_mla_spec_(block_spec, config)
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with device, _te_linear_placeholder():
        return GPTModel(
            config=config,
            transformer_layer_spec=block_spec,
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=spec.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(spec.rope_base),
        )


class _NoTELinear:
    """Stands for Transformer Engine's ``TELinear`` when TE is absent (never instantiated)."""


@contextlib.contextmanager
def _te_linear_placeholder():
    """megatron-core 0.16's MLA runs ``isinstance(x, TELinear)`` even without Transformer Engine,
    where ``TELinear`` is a mock (or None) and the check raises TypeError. While building, give it
    a class nothing is an instance of; the original is restored afterwards. Does nothing when
    ``TELinear`` is a real class."""
    from megatron.core.transformer import multi_latent_attention as mla

    original = getattr(mla, "TELinear", None)
    if isinstance(original, type):
        yield
        return
    mla.TELinear = _NoTELinear
    try:
        yield
    finally:
        mla.TELinear = original


def _refuses_local_kv_norm() -> bool:
    """True for megatron-core versions whose MLA resolves q/kv norms through
    ``mla_qk_norm_config`` (0.19+), which needs a fused norm+linear the local backend lacks."""
    import importlib.util

    return importlib.util.find_spec("megatron.core.transformer.mla_qk_norm_config") is not None


def _adapt_local_mla_spec_(block_spec, config) -> None:
    """Make a freshly built local block spec buildable with MLA. Mutates ``block_spec``:

    - the core attention becomes :class:`.mla_attention.SDPACoreAttention` (the local
      ``DotProductAttention`` rejects MLA's separate q/k and v widths);
    - without ``q_lora_rank`` the query norm becomes ``IdentityOp`` (there is no query latent to
      normalise; megatron-core 0.19 refuses an unused norm, 0.16 ignores it).
    """
    from megatron.core.transformer.identity_op import IdentityOp

    from .mla_attention import SDPACoreAttention

    for layer_spec in block_spec.layer_specs:
        attention = layer_spec.submodules.self_attention.submodules
        attention.core_attention = SDPACoreAttention
        if config.q_lora_rank is None and hasattr(attention, "q_layernorm"):
            attention.q_layernorm = IdentityOp
        if not config.qk_layernorm and hasattr(attention, "kv_layernorm"):
            attention.kv_layernorm = IdentityOp


def megatron_args(spec: ModelSpec, *, grouped_gemm: bool = True) -> list[str]:
    """``pretrain_gpt.py`` flags for ``spec``'s architecture (no parallelism, data or optimizer
    flags). The vocabulary size is given through ``--vocab-size`` for a null tokenizer; real runs
    set their tokenizer and Megatron pads the vocabulary itself."""
    a = spec.attention
    args = [
        "--num-layers", str(spec.num_layers),
        "--hidden-size", str(spec.hidden),
        "--ffn-hidden-size", str(spec.dense_ffn),
        "--num-attention-heads", str(a.num_heads),
        "--kv-channels", str(a.v_head_dim),
        "--multi-latent-attention",
        "--kv-lora-rank", str(a.kv_lora_rank),
        "--qk-head-dim", str(a.qk_nope_head_dim),
        "--qk-pos-emb-head-dim", str(a.qk_rope_head_dim),
        "--v-head-dim", str(a.v_head_dim),
        "--qk-layernorm",
        "--rope-type", "rope",
        "--position-embedding-type", "rope",
        "--rotary-base", str(int(spec.rope_base)),
        "--normalization", "RMSNorm",
        "--norm-epsilon", str(spec.norm_eps),
        "--swiglu",
        "--disable-bias-linear",
        "--seq-length", str(spec.seq_length),
        "--max-position-embeddings", str(spec.seq_length),
        "--vocab-size", str(spec.vocab_size),
        "--hidden-dropout", "0.0",
        "--attention-dropout", "0.0",
    ]
    if a.q_lora_rank is not None:
        args += ["--q-lora-rank", str(a.q_lora_rank)]
    if not spec.tie_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if spec.moe is not None:
        m = spec.moe
        pattern = "[" + ",".join(str(x) for x in spec.moe_layer_pattern) + "]"
        args += [
            "--num-experts", str(m.num_experts),
            "--moe-ffn-hidden-size", str(m.expert_ffn),
            "--moe-router-topk", str(m.top_k),
            "--moe-layer-freq", pattern,
            "--moe-router-score-function", m.score_function,
            "--moe-router-topk-scaling-factor", str(m.routed_scaling_factor),
            "--moe-router-load-balancing-type", "none",
            "--moe-aux-loss-coeff", "0.0",
            "--moe-router-dtype", "fp32",
            "--moe-token-dispatcher-type", "alltoall",
        ]
        if m.num_shared_experts:
            args += ["--moe-shared-expert-intermediate-size", str(m.shared_ffn)]
        if m.expert_bias:
            args += ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", str(m.bias_update_rate)]
        if grouped_gemm:
            args.append("--moe-grouped-gemm")
    return args
