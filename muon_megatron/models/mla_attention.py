"""A parameter-free causal core attention for megatron-core's MLA with the local layer spec.

megatron-core's local ``DotProductAttention`` (0.16-0.19) rejects the separate query/key and
value widths MLA passes (``k_channels``, ``v_channels``), so MLA otherwise needs Transformer
Engine. :class:`SDPACoreAttention` takes the same constructor and forward arguments and computes
softmax attention with ``torch.nn.functional.scaled_dot_product_attention``: causal, or under
Megatron's boolean ``attention_mask`` (True = masked out) when one is passed. It has no
parameters, so models built with it have exactly the parameters of the TE build. Plain torch:
no megatron import. Not supported: packed sequences, context parallelism, attention bias.

QK-Clip: inside ``with recorder:`` (a :class:`~muon_megatron.core.qk_clip.MaxLogitRecorder`) it
records the per-head max logit of the heads it holds (a tensor-parallel rank's own heads) under
``max_logit_name`` (default ``"layer<layer_number>"``, Megatron's 1-based global layer number;
an adapter may rename it), over the logits the softmax sees (under Megatron's ``attention_mask``
when one is passed, else causal). Outside a recorder nothing extra runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.qk_clip import active_recorder


class SDPACoreAttention(torch.nn.Module):
    """Causal (or masked) attention on Megatron's ``[s, b, heads, dim]`` tensors; returns ``[s, b, heads * v]``."""

    def __init__(self, config=None, layer_number=None, attn_mask_type=None, attention_type=None,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None, **unused):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.dropout = float(attention_dropout if attention_dropout is not None
                             else getattr(config, "attention_dropout", 0.0) or 0.0)
        self.hidden_size_per_attention_head_v = v_channels
        self.max_logit_name = f"layer{layer_number}"

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports neither packed sequences nor attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        recorder = active_recorder()
        if recorder is not None:
            scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
            # the logits the softmax below sees: Megatron's mask when given, else causal
            recorder.record_logits(self.max_logit_name, q, k, scale=scale, causal=attention_mask is None,
                                   masked_out=attention_mask)
        # Megatron's masks are True where attention is masked out; SDPA's boolean masks are True
        # where it is allowed. Without a mask (e.g. --no-create-attention-mask-in-dataloader) the
        # causal kernels run.
        allowed = None if attention_mask is None else ~attention_mask.to(torch.bool)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, is_causal=allowed is None, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
