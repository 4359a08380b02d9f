"""Workers that build an example's model the way Megatron-LM's ``pretrain_gpt.py`` does (megatron-core
0.19's ``megatron/training``), run inside spawned gloo workers (``tests/megatron/mcore_harness``).

``pretrain_gpt.py`` (core_r0.19.0) calls ``parse_and_validate_args(args_defaults={'tokenizer_type':
'GPT2BPETokenizer'})``, ``gpt_config_from_args(args)`` and ``pretrain(...)``, which builds the model
through the config's ``GPTModelBuilder`` (``default_layer_spec``: ``get_gpt_decoder_block_spec`` for
MoE models, with ``use_transformer_engine`` from ``--transformer-impl``). The same calls are made
here, with ``muon_megatron.megatron.install()`` applied first as the launcher does.
"""

from __future__ import annotations

import math
import os
import sys

PRETRAIN_GPT_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}  # pretrain_gpt.py's args_defaults


def build_examples(rank, world_size, cases):
    """For each case ``{"argv", "world_size", "build": None | "meta" | "real", "forward": bool}``:
    parse and validate ``argv`` as ``pretrain_gpt.py`` would (under ``WORLD_SIZE=world_size``), build
    its ``TransformerConfig`` and, when asked, its model. Returns one dict per case; a case that fails
    returns ``{"error": "<type>: <message>"}`` so that one bad example does not hide the others."""
    import torch

    # validate_args asks the GPU's compute capability for --moe-grouped-gemm (>= 8, Ampere); the
    # examples target H100/H200-class GPUs.
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    import muon_megatron.megatron as mm

    mm.install()
    results = []
    for case in cases:
        try:
            results.append(_build_one(case))
        except Exception as err:  # reported per case; the test names the example and backend
            results.append({"error": f"{type(err).__name__}: {err}"})
        finally:
            _reset()
    return results


def _build_one(case):
    import torch
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args

    os.environ["WORLD_SIZE"] = str(case["world_size"])
    sys.argv = ["pretrain_gpt.py", *case["argv"]]
    args = parse_and_validate_args(args_defaults=PRETRAIN_GPT_DEFAULTS)
    out = {
        "optimizer": args.optimizer,
        "use_distributed_optimizer": args.use_distributed_optimizer,
        "data_parallel_size": args.data_parallel_size,
        "train_iters": args.train_iters,
        "lr_warmup_iters": args.lr_warmup_iters,
    }
    config = core_transformer_config_from_args(args)
    out.update(
        transformer_impl=config.transformer_impl,
        moe_grouped_gemm=config.moe_grouped_gemm,
        apply_rope_fusion=config.apply_rope_fusion,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
    )
    if case.get("build") is None:
        return out
    meta = case["build"] == "meta"
    if meta:  # no memory, no initialisation: a 16 B model's names and shapes only
        config.use_cpu_initialization = True
        config.perform_initialization = False
    model_config = gpt_config_from_args(args, config=config)
    model_config.finalize()
    builder = model_config.get_builder_cls()(model_config)
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    ps.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                 expert_model_parallel_size=args.expert_model_parallel_size)
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = builder.build_model(pg_collection, pre_process=True, post_process=True)
    else:
        model = builder.build_model(pg_collection, pre_process=True, post_process=True)
    layer0 = model.decoder.layers[0]
    moe_layer = next(layer for layer in model.decoder.layers if hasattr(layer.mlp, "experts"))
    out.update(
        parameters={name: tuple(p.shape) for name, p in model.named_parameters()},
        attention=type(layer0.self_attention).__name__,
        core_attention=type(layer0.self_attention.core_attention).__name__,
        experts=type(moe_layer.mlp.experts).__name__,
    )
    if case.get("forward"):
        out.update(_forward_backward(model, args))
    return out


def _forward_backward(model, args):
    """One forward/backward on random tokens, as pretrain_gpt.py's forward_step calls the model
    (no attention mask under --no-create-attention-mask-in-dataloader)."""
    import torch

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.padded_vocab_size, (2, args.seq_length + 1), generator=g)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(args.seq_length).unsqueeze(0).expand_as(inputs)
    losses = model(inputs, position_ids, None, labels=labels)
    loss = losses.float().mean()
    loss.backward()
    finite = {name: p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0)
              for name, p in model.named_parameters()}
    return {"loss": float(loss), "grad_nonzero_finite": finite, "uniform_loss": math.log(args.padded_vocab_size)}


def _reset():
    from megatron.core import parallel_state as ps
    from megatron.training import global_vars

    ps.destroy_model_parallel()
    global_vars.unset_global_variables()
