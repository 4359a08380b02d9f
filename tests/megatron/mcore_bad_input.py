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
