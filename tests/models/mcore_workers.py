"""Functions run inside spawned megatron-core workers (``tests/megatron/mcore_harness.run_world``)."""

from __future__ import annotations


def meta_parameter_shapes(rank, world_size, model_name):
    """Build ``model_name`` on the meta device (TP = PP = EP = 1); return {name: shape}."""
    from megatron.core import parallel_state as ps

    from muon_megatron.models import get_model
    from muon_megatron.models.megatron_config import build_gpt_model

    ps.initialize_model_parallel(1, 1)
    model = build_gpt_model(get_model(model_name), meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def mini_forward_backward(rank, world_size):
    """Build Moonlight-mini for real on the CPU, run one forward/backward; return the loss and
    whether every parameter got a finite gradient."""
    import torch
    from megatron.core import parallel_state as ps

    from muon_megatron.models import MOONLIGHT_MINI
    from muon_megatron.models.megatron_config import build_gpt_model

    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16 leaves ``te_general_gemm`` undefined without Transformer Engine and the
    # router reads it (NameError); define it as absent, as 0.19 does. Tests only.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    ps.initialize_model_parallel(1, 1)
    spec = MOONLIGHT_MINI.replace(seq_length=32)
    torch.manual_seed(0)
    # The alltoall dispatcher synchronises on a CUDA event (0.19), which the CPU shim cannot give.
    model = build_gpt_model(spec, params_dtype=torch.float32, moe_token_dispatcher_type="allgather")
    tokens = torch.randint(0, spec.vocab_size, (2, spec.seq_length + 1))
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    loss = model(inputs, position_ids, None, labels=labels).float().mean()
    loss.backward()
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all())
                   for n, p in model.named_parameters() if "router" not in n or p.grad is not None)
    return float(loss), grads_ok
