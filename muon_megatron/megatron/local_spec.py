"""Multi-latent attention (MLA) with megatron-core's local layer spec, i.e. without Transformer Engine.

megatron-core's local layer spec (``--transformer-impl local``) cannot build MLA:

- the local ``DotProductAttention`` takes no ``k_channels`` / ``v_channels``, which MLA passes
  (its query/key heads are wider than its value heads): ``DotProductAttention.__init__() got an
  unexpected keyword argument 'k_channels'``;
- from 0.19, with ``--qk-layernorm`` and no ``--q-lora-rank`` (Moonlight's layout), MLA's norm
  resolver (``mla_qk_norm_config.QKNormConfigResolver``) wants a query norm fused into
  ``linear_q_proj``, which only Transformer Engine provides.

:func:`install_local_mla` wraps ``gpt_layer_specs.get_gpt_layer_local_submodules``, through which
every local GPT spec is built (``get_gpt_layer_local_spec``, ``get_gpt_decoder_block_spec`` with
``use_transformer_engine=False``, hence Megatron-LM's ``pretrain_gpt.py`` and its
``GPTModelBuilder``). For MLA layers it changes exactly two entries of the returned submodules:

- ``core_attention``: :class:`muon_megatron.models.mla_attention.SDPACoreAttention`, causal (or
  masked) attention through ``torch.nn.functional.scaled_dot_product_attention`` (no parameters);
- the attention module: :class:`LocalMLASelfAttention`, Megatron's ``MLASelfAttention`` whose
  norms come from the spec as written: the KV-latent norm (``kv_layernorm``) as a standalone
  norm before a plain ``linear_kv_up_proj`` under ``--qk-layernorm``, a query-latent norm
  (``q_layernorm``) only with ``--q-lora-rank``, and a plain ``linear_q_proj`` otherwise. This is
  DeepSeek-V3 / Moonlight's attention; the Transformer Engine build of megatron-core >= 0.19 adds
  a norm fused into ``linear_q_proj`` that the model does not have.

Nothing else changes: a non-MLA layer, a Transformer Engine spec and a Kitchen spec are returned
as built. Not supported by the local MLA: context parallelism and tensor parallelism (refused when
the layer is built; under TP 2 its gradients were measured about 5 % off TP 1's), packed sequences
(``--sft``, THD) and attention bias (refused by ``SDPACoreAttention``).

Called by :func:`muon_megatron.megatron.install` (so by ``python -m muon_megatron.megatron.launch``
and ``muon-megatron megatron``). Imports megatron-core. The wrapped function exists from
megatron-core 0.17 (0.17.1, 0.18.2, 0.19.2 and main's sources have it); runs were made on 0.19.2 and
on Megatron-LM main (0.20 development).
"""

from __future__ import annotations

import logging

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from ..models.mla_attention import SDPACoreAttention

logger = logging.getLogger(__name__)

_ORIGINAL: dict = {}


class LocalMLASelfAttention(MLASelfAttention):
    """``MLASelfAttention`` built from a local spec: the q/kv norms and projections are the spec's
    standalone modules, never a fused norm+linear (which only Transformer Engine has).

    Parameters are those of DeepSeek-V3's MLA: ``linear_q_proj`` (or ``linear_q_down_proj``,
    ``q_layernorm``, ``linear_q_up_proj`` with ``q_lora_rank``), ``linear_kv_down_proj``,
    ``kv_layernorm`` (with ``qk_layernorm``), ``linear_kv_up_proj``, ``linear_proj``.
    """

    def __init__(self, config, *args, **kwargs):
        if getattr(config, "context_parallel_size", 1) > 1:
            raise ValueError(
                "multi-latent attention without Transformer Engine (--transformer-impl local) does not "
                "support context parallelism: use --context-parallel-size 1, or Transformer Engine"
            )
        if getattr(config, "tensor_model_parallel_size", 1) > 1:
            # Measured on megatron-core 0.19.2 (CPU, a tiny model): the forward matches TP 1, but the
            # gradients at TP 2 differ from TP 1's by about 5 %. Refused until that is understood.
            raise ValueError(
                "multi-latent attention without Transformer Engine (--transformer-impl local) does not train "
                "like TP 1 under tensor parallelism (its gradients at TP 2 differ from TP 1's by about 5 %, "
                "measured): use --tensor-model-parallel-size 1 (data and expert parallelism are fine), or "
                "Transformer Engine"
            )
        super().__init__(config, *args, **kwargs)

    def _resolve_qk_norm_config(self, submodules) -> dict:
        # megatron-core >= 0.19 asks this for the modules to build; 0.17 / 0.18 read the spec's
        # q_layernorm / kv_layernorm directly.
        config = self.config
        if getattr(config, "qk_l2_norm", False):
            raise ValueError("--qk-l2-norm is not supported with multi-latent attention")
        with_norm = bool(config.qk_layernorm)
        q_lora = config.q_lora_rank is not None
        return dict(
            linear_q_proj=IdentityOp if q_lora else submodules.linear_q_proj,
            linear_q_up_proj=submodules.linear_q_up_proj if q_lora else IdentityOp,
            linear_kv_up_proj=submodules.linear_kv_up_proj,
            q_layernorm=submodules.q_layernorm if (with_norm and q_lora) else IdentityOp,
            kv_layernorm=submodules.kv_layernorm if with_norm else IdentityOp,
        )


def adapt_local_mla_submodules_(submodules):
    """Make local ``TransformerLayerSubmodules`` able to build MLA (in place; returns them).

    Acts only when the self-attention is megatron-core's ``MLASelfAttention`` with the local
    ``DotProductAttention`` as core attention; anything else is left as it is."""
    attention = getattr(submodules, "self_attention", None)
    if getattr(attention, "module", None) is not MLASelfAttention:
        return submodules
    inner = attention.submodules
    if inner.core_attention is not DotProductAttention:
        return submodules
    inner.core_attention = SDPACoreAttention
    attention.module = LocalMLASelfAttention
    return submodules


def _local_submodules(*args, **kwargs):
    return adapt_local_mla_submodules_(_ORIGINAL["get_gpt_layer_local_submodules"](*args, **kwargs))


def install_local_mla() -> bool:
    """Wrap ``gpt_layer_specs.get_gpt_layer_local_submodules`` as described above (idempotent).
    Returns whether the wrapper is in place: megatron-core 0.16 builds its local specs without
    that function, and is left as it is (MLA there needs Transformer Engine or
    ``muon_megatron.models.megatron_config.build_gpt_model``)."""
    if _ORIGINAL:
        return True
    if not hasattr(gpt_layer_specs, "get_gpt_layer_local_submodules"):
        logger.info("muon-megatron: this megatron-core builds local specs without get_gpt_layer_local_submodules; "
                    "multi-latent attention without Transformer Engine is not provided")
        return False
    _ORIGINAL["get_gpt_layer_local_submodules"] = gpt_layer_specs.get_gpt_layer_local_submodules
    gpt_layer_specs.get_gpt_layer_local_submodules = _local_submodules
    return True


def uninstall_local_mla() -> None:
    """Undo :func:`install_local_mla` (for tests)."""
    if _ORIGINAL:
        gpt_layer_specs.get_gpt_layer_local_submodules = _ORIGINAL.pop("get_gpt_layer_local_submodules")
