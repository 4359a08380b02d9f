"""Read a model (and its parallel sizes) from Megatron ``pretrain_gpt.py`` arguments.

An argument file is the flags of a Megatron launch, as written in a shell script: whitespace or
newline separated, ``#`` comments, backslash line continuations, ``$VARS`` left unexpanded (a
flag whose value is a variable is an error naming it). Only the flags that shape the model and
its parallel layout are read; every other flag is ignored. No megatron import: the parser here
knows the few flags it needs and Megatron's defaults for them.

Supported: MLA models (``--multi-latent-attention``), dense or MoE with ``--moe-layer-freq``
given as an integer or a Python-style list such as ``[0]+[1]*26``. A model without MLA is
refused with a message (``muon-megatron plan`` describes Moonlight-family models only).
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from dataclasses import dataclass
from typing import Optional, Sequence

from .spec import MLASpec, ModelSpec, MoESpec


@dataclass(frozen=True)
class ParallelArgs:
    """Parallel sizes found in the arguments (None where a flag was absent)."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    ep: Optional[int] = None
    etp: Optional[int] = None


def read_argument_file(path: str) -> list[str]:
    """The flags of an argument file as a list of tokens."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"\\\n", " ", text)
    tokens = []
    for line in text.splitlines():
        tokens += shlex.split(line, comments=True)
    return tokens


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add = p.add_argument
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--kv-lora-rank",
                 "--qk-head-dim", "--qk-pos-emb-head-dim", "--v-head-dim", "--q-lora-rank", "--vocab-size",
                 "--num-experts", "--moe-ffn-hidden-size", "--moe-router-topk",
                 "--moe-shared-expert-intermediate-size", "--seq-length", "--tensor-model-parallel-size",
                 "--pipeline-model-parallel-size", "--expert-model-parallel-size", "--expert-tensor-parallel-size",
                 "--padded-vocab-size"):
        add(flag, type=str)
    add("--multi-latent-attention", action="store_true")
    add("--untie-embeddings-and-output-weights", action="store_true")
    add("--moe-layer-freq", type=str, default="1")
    add("--moe-router-score-function", type=str, default="softmax")
    add("--moe-router-enable-expert-bias", action="store_true")
    add("--moe-router-bias-update-rate", type=str, default="1e-3")
    add("--moe-router-topk-scaling-factor", type=str)
    add("--rotary-base", type=str, default="10000")
    add("--norm-epsilon", type=str, default="1e-5")
    return p


def _int(ns, attr: str, flag: str, default: Optional[int] = None, required: bool = False) -> Optional[int]:
    value = getattr(ns, attr)
    if value is None:
        if required:
            raise ValueError(f"the Megatron arguments lack {flag}, which the model needs")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{flag} {value!r} is not an integer (shell variables are not expanded)") from None


def _moe_pattern(text: str, num_layers: int) -> list[int]:
    """Megatron's ``--moe-layer-freq``: an integer k (every k-th layer MoE) or a list expression."""
    text = text.strip()
    if text.isdigit():
        k = int(text)
        return [int(i % k == 0) for i in range(num_layers)]
    try:
        value = _eval_list(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"--moe-layer-freq {text!r} is neither an integer nor a list like [0]+[1]*26: {err}") from None
    if len(value) != num_layers or any(v not in (0, 1) for v in value):
        raise ValueError(f"--moe-layer-freq {text!r} must list {num_layers} zeros and ones")
    return value


def _eval_list(node) -> list[int]:
    """Evaluate list literals, ``+`` and ``* int`` only (no eval of arbitrary code)."""
    if isinstance(node, ast.List):
        return [int(ast.literal_eval(e)) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _eval_list(node.left) + _eval_list(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _eval_list(node.left) * int(ast.literal_eval(node.right))
    raise ValueError("unsupported expression")


def spec_from_megatron_args(args: Sequence[str], *, name: str = "from-megatron-args") -> tuple[ModelSpec, ParallelArgs]:
    """The :class:`ModelSpec` and parallel sizes described by Megatron flags ``args``."""
    ns, _ = _parser().parse_known_args(list(args))
    if not ns.multi_latent_attention:
        raise ValueError(
            "the Megatron arguments describe a model without --multi-latent-attention; the sizing's model "
            "descriptions cover Moonlight-family (MLA) models only"
        )
    num_layers = _int(ns, "num_layers", "--num-layers", required=True)
    hidden = _int(ns, "hidden_size", "--hidden-size", required=True)
    heads = _int(ns, "num_attention_heads", "--num-attention-heads", required=True)
    vocab = _int(ns, "padded_vocab_size", "--padded-vocab-size") or _int(ns, "vocab_size", "--vocab-size", required=True)
    attention = MLASpec(
        num_heads=heads,
        kv_lora_rank=_int(ns, "kv_lora_rank", "--kv-lora-rank", 32),
        qk_nope_head_dim=_int(ns, "qk_head_dim", "--qk-head-dim", 128),
        qk_rope_head_dim=_int(ns, "qk_pos_emb_head_dim", "--qk-pos-emb-head-dim", 64),
        v_head_dim=_int(ns, "v_head_dim", "--v-head-dim", 128),
        q_lora_rank=_int(ns, "q_lora_rank", "--q-lora-rank"),
    )
    moe = None
    first_dense = 0
    num_experts = _int(ns, "num_experts", "--num-experts")
    if num_experts:
        pattern = _moe_pattern(ns.moe_layer_freq, num_layers)
        first_dense = pattern.index(1) if 1 in pattern else num_layers
        if pattern != [0] * first_dense + [1] * (num_layers - first_dense):
            raise ValueError(
                f"--moe-layer-freq {ns.moe_layer_freq!r}: only leading dense layers followed by MoE layers are "
                "described (Moonlight's pattern)"
            )
        expert_ffn = _int(ns, "moe_ffn_hidden_size", "--moe-ffn-hidden-size", required=True)
        shared = _int(ns, "moe_shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size", 0)
        if shared % expert_ffn:
            raise ValueError(
                f"--moe-shared-expert-intermediate-size {shared} is not a multiple of --moe-ffn-hidden-size "
                f"{expert_ffn}"
            )
        moe = MoESpec(
            num_experts=num_experts,
            expert_ffn=expert_ffn,
            top_k=_int(ns, "moe_router_topk", "--moe-router-topk", 2),
            num_shared_experts=shared // expert_ffn,
            score_function=ns.moe_router_score_function,
            expert_bias=ns.moe_router_enable_expert_bias,
            bias_update_rate=float(ns.moe_router_bias_update_rate),
            routed_scaling_factor=float(ns.moe_router_topk_scaling_factor or 1.0),
        )
    spec = ModelSpec(
        name=name,
        num_layers=num_layers,
        hidden=hidden,
        dense_ffn=_int(ns, "ffn_hidden_size", "--ffn-hidden-size", 4 * hidden),
        vocab_size=vocab,
        attention=attention,
        moe=moe,
        first_dense_layers=first_dense if moe else num_layers,
        seq_length=_int(ns, "seq_length", "--seq-length", 4096),
        rope_base=float(ns.rotary_base),
        norm_eps=float(ns.norm_epsilon),
        tie_embeddings=not ns.untie_embeddings_and_output_weights,
    )
    parallel = ParallelArgs(
        tp=_int(ns, "tensor_model_parallel_size", "--tensor-model-parallel-size"),
        pp=_int(ns, "pipeline_model_parallel_size", "--pipeline-model-parallel-size"),
        ep=_int(ns, "expert_model_parallel_size", "--expert-model-parallel-size"),
        etp=_int(ns, "expert_tensor_parallel_size", "--expert-tensor-parallel-size"),
    )
    return spec, parallel
