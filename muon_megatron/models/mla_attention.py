"""A parameter-free causal core attention for megatron-core's MLA with the local layer spec.

megatron-core's local ``DotProductAttention`` (0.16-0.19) rejects the separate query/key and
value widths MLA passes (``k_channels``, ``v_channels``), so MLA otherwise needs Transformer
Engine. :class:`SDPACoreAttention` takes the same constructor and forward arguments and computes
causal softmax attention with ``torch.nn.functional.scaled_dot_product_attention``. It has no
parameters, so models built with it have exactly the parameters of the TE build. Plain torch:
no megatron import. Not supported: packed sequences, context parallelism, attention bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SDPACoreAttention(torch.nn.Module):
    """Causal attention on Megatron's ``[s, b, heads, dim]`` tensors; returns ``[s, b, heads * v]``."""

    def __init__(self, config=None, layer_number=None, attn_mask_type=None, attention_type=None,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None, **unused):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.dropout = float(attention_dropout if attention_dropout is not None
                             else getattr(config, "attention_dropout", 0.0) or 0.0)
        self.hidden_size_per_attention_head_v = v_channels

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports neither packed sequences nor attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, dropout_p=self.dropout if self.training else 0.0
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
