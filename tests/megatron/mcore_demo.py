"""Worker for ``test_megatron_demo``: the demo's megatron engine (``demo_engines.MegatronRunner``)
trains Moonlight-mini for a few steps in a spawned gloo rank under the test CPU shim."""

from __future__ import annotations

import argparse

import torch


def demo_worker(rank, world, steps):
    from muon_megatron.demo import engines as demo_engines
    from muon_megatron.demo.command import _Quiet
    from muon_megatron.demo.data import load_corpus, sample_batch

    args = argparse.Namespace(model="moonlight-mini", seed=0, lr=1e-2, weight_decay=0.1, steps=steps, warmup=0.1,
                              batch_size=4, seq_len=32, eval_every=steps, ns_dtype_resolved=torch.float32)
    spec = demo_engines.model_spec(args)
    train, val, _ = load_corpus(300_000)
    val_gen = torch.Generator().manual_seed(2)
    val_batches = [sample_batch(val, 4, 32, val_gen) for _ in range(2)]
    quiet = lambda iterable, **kwargs: _Quiet(iterable)  # noqa: E731
    results = {}
    for name in ("muon", "adamw"):
        r = demo_engines.train_one(name, "megatron", spec, args, train, val_batches, torch.device("cpu"), quiet)
        results[name] = {k: r[k] for k in ("engine", "first_train_loss", "final_train_loss", "initial_val_loss",
                                           "final_val_loss")} | {"steps": len(r["train_loss"])}
    return results
