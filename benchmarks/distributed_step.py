"""Step time of DistributedMuon: gathering pieces (flat ZeRO-1 cut) against the matrix-aligned layout.

Spawns ``--world`` gloo ranks on 127.0.0.1 (CPU), builds Moonlight-mini's Muon matrices (experts
as separate parameters), shards them either as one flat buffer cut in equal partitions (matrices
straddle partitions; pieces are gathered to owners) or by :func:`aligned_layout` (each matrix whole
on one rank; no Muon traffic), and times ``DistributedMuon.step`` (median of ``--steps`` after a
warm-up). Prints one table row per layout: ms per step (max over ranks), NS imbalance, elements sent.

    python benchmarks/distributed_step.py [--world 4] [--steps 5] [--model moonlight-mini]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muon_megatron import ExpertStack, Whole
from muon_megatron.distributed import AlignItem, DistributedMuon, ParamSpec, aligned_layout, flat_layouts
from muon_megatron.models import get_model, weights


def muon_specs(model_name: str) -> list[ParamSpec]:
    out = []
    for w in weights(get_model(model_name)):
        if not w.use_muon:
            continue
        if isinstance(w.split, ExpertStack):
            out += [ParamSpec(f"{w.name}.weight{e}", w.shape[1:], w.split.inner or Whole()) for e in range(w.shape[0])]
        else:
            out.append(ParamSpec(w.name, w.shape, w.split))
    return out


def layouts_for(kind: str, specs, world: int):
    if kind == "gather":
        return flat_layouts(specs, world)
    items = [AlignItem.of(s.key, s.shape, s.split) for s in specs]
    return aligned_layout(items, world).layouts(specs)


def worker(rank, world, port, model_name, steps, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    specs = muon_specs(model_name)
    for kind in ("gather", "aligned"):
        mine = layouts_for(kind, specs, world)[rank]
        tensors = [torch.randn(lay.numel) for lay in mine]
        opt = DistributedMuon([{"params": tensors, "layouts": mine}], lr=1e-3) if tensors else DistributedMuon(
            [{"params": [torch.zeros(0)], "layouts": [[]]}], lr=1e-3)
        times = []
        for k in range(steps + 1):
            for t in opt.param_groups[0]["params"]:
                t.grad = torch.randn_like(t)
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dist.barrier()
            if k:
                times.append(time.perf_counter() - t0)
        if rank == 0:
            plan = opt.plan
            queue.put((kind, statistics.median(times) * 1e3, plan.imbalance, sum(plan.gather_elems) + sum(plan.return_elems),
                       len(plan.matrices)))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", default="moonlight-mini")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(worker, args=(args.world, port, args.model, args.steps, queue), nprocs=args.world,
                       start_method="spawn")
    print(f"| layout | ms/step (median, {args.world} gloo ranks, CPU) | NS max/mean | elements sent | matrices |")
    print("|---|---|---|---|---|")
    while not queue.empty():
        kind, ms, imbalance, sent, n = queue.get()
        print(f"| {kind} | {ms:.1f} | {imbalance:.3f} | {sent} | {n} |")


if __name__ == "__main__":
    main()
