"""Worker for the bad-input tests: each case builds the adapter wrongly on purpose and records the
error type and message (one spawned world runs them all, to keep the suite fast)."""

from __future__ import annotations

import torch

import mcore_models as mm


def _ddp(model, distopt):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig

    return DDP(model.config, DistributedDataParallelConfig(use_distributed_optimizer=distopt, bucket_size=1000), model)


def _config(distopt, **kw):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(optimizer="muon", lr=0.01, use_distributed_optimizer=distopt, **kw)


def _error(fn):
    try:
        fn()
    except Exception as err:  # the test inspects type and message
        return type(err).__name__, str(err)
    return None, "no error"


def bad_input_worker(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import get_megatron_optimizer

    from muon_megatron.megatron import MuonSettings, get_muon_optimizer

    ps.initialize_model_parallel()
    spec = mm.TinySpec()
    model = mm.build_gpt(spec)
    ddp = _ddp(model, True)
    out = {}
    out["pattern_matches_nothing"] = _error(
        lambda: get_muon_optimizer(_config(True), [ddp], MuonSettings(adamw_params=("*no_such_param*",)))
    )
    out["one_d_forced_to_muon"] = _error(
        lambda: get_muon_optimizer(_config(True), [ddp], MuonSettings(muon_params=("*final_layernorm*",)))
    )
    out["cpu_offload"] = _error(lambda: get_muon_optimizer(_config(True, optimizer_cpu_offload=True), [ddp]))
    out["distopt_mismatch"] = _error(lambda: get_muon_optimizer(_config(False), [ddp]))
    out["not_ddp_wrapped"] = _error(lambda: get_muon_optimizer(_config(False), [model]))

    # Optimizer state of megatron-core's own Adam (as a checkpoint holds it) loaded into Muon, with and
    # without the distributed optimizer.
    for distopt in (True, False):
        m = mm.build_gpt(spec)
        d = _ddp(m, distopt)
        adam = get_megatron_optimizer(_config(distopt).__class__(optimizer="adam", lr=0.01,
                                                                 use_distributed_optimizer=distopt), [d])
        for p in d.parameters():
            p.main_grad.zero_()
        adam.step()
        saved = adam.state_dict()
        muon = get_muon_optimizer(_config(distopt), [d])
        out[f"adam_state_into_muon_distopt_{distopt}"] = _error(lambda: muon.load_state_dict(saved))
    torch.distributed.barrier()
    return out


def expert_tp_without_ep_worker(rank, world):
    """Tensor parallel 1, expert tensor parallel 2, expert parallel 1 on two ranks: whether this
    megatron-core reduces the routed experts as dense weights (``allreduce`` True), what its gradient
    sync does to one expert fc1 shard's gradient on the two ranks, and what get_muon_optimizer says."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from muon_megatron.megatron import get_muon_optimizer

    ps.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=1,
                                 expert_tensor_parallel_size=2)
    spec = mm.TinySpec(num_moe_experts=2, moe_ffn_hidden_size=16)
    model = mm.build_gpt(spec)
    ddp = _ddp(model, False)  # an all-reduce: every rank's whole gradient is the reduced one
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n and "shared_experts" not in n}
    name, fc1 = next((n, p) for n, p in experts.items() if n.endswith("linear_fc1.weight"))
    ddp.zero_grad_buffer()
    # the same tokens on both ranks: a correct reduction leaves each shard's gradient as it was
    mm.loss_of(ddp, mm.batch(0, spec)).backward()
    before = fc1.main_grad.detach().clone()
    finalize_model_grads([ddp])
    after = fc1.main_grad.detach().clone()
    peers = [None] * world
    torch.distributed.all_gather_object(peers, (before, after))
    (b0, a0), (b1, a1) = peers
    mean = (b0 + b1) / 2
    out = {
        "reduced_as_dense": all(getattr(p, "allreduce", True) for p in experts.values()),
        "shards_differ_before": float((b0 - b1).norm() / b0.norm()),
        # after the sync: this rank's gradient against the mean of the two ranks' (different) shards,
        # and against its own shard scaled by 1/2 (averaging over the two data-parallel ranks whose
        # tokens the shard saw: what a correct reduction over expert-data-parallel size 1 does)
        "after_vs_mean_of_both_shards": float((after - mean).norm() / mean.norm()),
        "after_vs_own_shard_halved": float((after - before / 2).norm() / (before / 2).norm()),
        "error": _error(lambda: get_muon_optimizer(_config(False), [ddp])),
        "name": name,
    }
    torch.distributed.barrier()
    return out
