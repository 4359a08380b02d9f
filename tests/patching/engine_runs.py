"""Short CPU runs on a patched engine tree, in a fresh process whose PYTHONPATH starts with the tree.

    python engine_runs.py megatron-import  TREE
    python engine_runs.py megatron-run     TREE
    python engine_runs.py megatron-args    TREE
    python engine_runs.py megatron-pretrain TREE
    python engine_runs.py deepspeed-import TREE
    python engine_runs.py deepspeed-run    TREE

Each prints one JSON line (the last line of stdout) for the test to read. The ``-run`` modes train
a tiny model a few steps twice from the same initial weights and batches: once through the
engine's own entry point (patched ``get_megatron_optimizer`` with ``config.optimizer = "muon"``, or
``deepspeed.initialize`` with ``"type": "muon"``), once through the plugin's entry point
(``get_muon_optimizer`` / ``muon_megatron.deepspeed.initialize``). Same code underneath, so the
weights must be identical (bitwise), and the optimizer must be muon_megatron's.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = 3
for _dir in (HERE, os.path.join(ROOT, "tests", "megatron"), os.path.join(ROOT, "tests", "deepspeed"), ROOT):
    if _dir not in sys.path:
        sys.path.insert(0, _dir)


def _report(**result) -> None:
    print(json.dumps(result))


def _under(module, tree: str) -> bool:
    return os.path.realpath(module.__file__).startswith(os.path.realpath(tree) + os.sep)


# ---------------------------------------------------------------------------------------------- megatron


def _megatron_world():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29731"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import cpu_shim

    cpu_shim.activate()
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()


def megatron_import(tree: str) -> None:
    import megatron.core.optimizer as mco

    _report(patched=_under(mco, tree), hook="get_megatron_muon_optimizer" in open(mco.__file__).read())


def _megatron_train(build, distopt: bool):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    import mcore_models as mm

    spec = mm.TinySpec()
    model = mm.build_gpt(spec)
    ddp = DDP(model.config, DistributedDataParallelConfig(use_distributed_optimizer=distopt, grad_reduce_in_fp32=True),
              model)
    config = OptimizerConfig(optimizer="muon", lr=0.02, min_lr=0.0, weight_decay=0.1, clip_grad=1.0,
                             use_distributed_optimizer=distopt, bf16=False, fp16=False)
    opt = build(config, [ddp])
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        mm.loss_of(ddp, mm.batch(step, spec)).backward()
        finalize_model_grads([ddp])
        ok, _, _ = opt.step()
        assert ok
    inner = {type(o.optimizer).__name__ for o in getattr(opt, "chained_optimizers", [opt])}
    return {n: p.detach().clone() for n, p in model.named_parameters()}, inner


def megatron_run(tree: str) -> None:
    _megatron_world()
    import megatron.core.optimizer as mco

    from muon_megatron.megatron import get_muon_optimizer

    out = {"patched": _under(mco, tree)}
    for distopt in (False, True):
        engine, engine_inner = _megatron_train(lambda c, m: mco.get_megatron_optimizer(c, m), distopt)
        plugin, plugin_inner = _megatron_train(lambda c, m: get_muon_optimizer(c, m), distopt)
        key = "distopt" if distopt else "replicated"
        out[key] = {
            "engine_inner": sorted(engine_inner), "plugin_inner": sorted(plugin_inner),
            "max_abs_diff": max(float((engine[n] - plugin[n]).abs().max()) for n in plugin),
            "moved": max(float((engine[n] - p0).abs().max()) for n, p0 in _initial().items()),
        }
    _report(**out)


def _initial():
    import mcore_models as mm

    return {n: p.detach().clone() for n, p in mm.build_gpt(mm.TinySpec()).named_parameters()}


def megatron_args(tree: str) -> None:
    """The patched ``megatron/training/arguments.py``: ``--optimizer muon`` and ``--muon-*`` parse,
    megatron-core's Muon defaults are replaced by Moonlight's, and validate_args routes to the hook."""
    import megatron.training.arguments as margs

    from muon_megatron.megatron.arguments import muon_settings_from_args

    parser = margs.add_megatron_arguments(__import__("argparse").ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(["--optimizer", "muon", "--muon-ns-dtype", "float32", "--muon-momentum", "0.9"])
    settings = muon_settings_from_args(args)
    defaults = muon_settings_from_args(parser.parse_args(["--optimizer", "muon"]))
    calls = []
    import muon_megatron.patching.hooks as hooks

    original = hooks.validate_muon_args

    def spy(validate, a, d=None):
        calls.append(a.optimizer)
        return "validated"

    hooks.validate_muon_args = spy
    try:
        routed = margs.validate_args(args, {})
    finally:
        hooks.validate_muon_args = original
    _report(patched=_under(margs, tree), optimizer=args.optimizer, ns_dtype=str(settings.ns_dtype),
            momentum=settings.momentum, default_momentum=defaults.momentum, default_nesterov=defaults.nesterov,
            default_scale=str(defaults.update_scale), validate_routed=routed == "validated" and calls == ["muon"])


def megatron_pretrain(tree: str) -> None:
    """Megatron's ``pretrain()`` loop, 2 gloo ranks, bf16, distributed optimizer with overlap."""
    os.environ["PYTHONPATH"] = os.pathsep.join([tree, HERE, ROOT, os.environ.get("PYTHONPATH", "")])
    from mcore_harness import run_world

    import patched_pretrain

    results = run_world(patched_pretrain.pretrain_worker_without_install, 2,
                        ["--use-distributed-optimizer", "--bf16", "--overlap-grad-reduce", "--overlap-param-gather"])
    _report(results=[dict(r, patched=r["arguments_file"].startswith(os.path.realpath(tree))) for r in results])


# ---------------------------------------------------------------------------------------------- deepspeed


def _deepspeed_world():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29732"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", DS_ACCELERATOR="cpu")
    import logging

    import torch

    torch.set_num_threads(1)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # One rank needs no shared-memory all-reduce; skipping DeepSpeed's JIT build of that op saves
    # about two minutes per release and Python on a cold cache.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


def deepspeed_import(tree: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _report(patched=_under(deepspeed, tree), version=deepspeed.__version__,
            hook="muon_megatron_hooks" in open(deepspeed.__file__).read())


def _deepspeed_train(initialize, stage: int):
    import _model

    model = _model.make_model(seed=0)
    config = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "muon", "params": {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": "float32"}},
    }
    engine, optimizer, _, _ = initialize(model=model, config=config)
    for step in range(STEPS):
        tokens, targets = _model.micro_batch(step, 0, 0)
        loss = engine(tokens, targets)
        engine.backward(loss)
        engine.step()
    client = getattr(optimizer, "optimizer", optimizer)
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}, type(client).__name__


def _model_module():
    import _model

    return _model


def deepspeed_run(tree: str) -> None:
    _deepspeed_world()
    import deepspeed

    import muon_megatron.deepspeed as mmds

    out = {"patched": _under(deepspeed, tree)}
    initial = {n: p.detach().clone() for n, p in _model_module().make_model(seed=0).named_parameters()}
    for stage in (0, 1):
        engine, engine_opt = _deepspeed_train(deepspeed.initialize, stage)
        plugin, plugin_opt = _deepspeed_train(mmds.initialize, stage)
        out[f"stage{stage}"] = {
            "engine_optimizer": engine_opt, "plugin_optimizer": plugin_opt,
            "max_abs_diff": max(float((engine[n] - plugin[n]).abs().max()) for n in plugin),
            "moved": max(float((engine[n] - initial[n]).abs().max()) for n in initial),
        }
    _report(**out)


if __name__ == "__main__":
    mode, tree = sys.argv[1], sys.argv[2]
    globals()[mode.replace("-", "_")](tree)
