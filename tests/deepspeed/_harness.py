"""Spawn one DeepSpeed world (CPU accelerator, gloo, 127.0.0.1) and run many scenarios in it.

Starting a world costs most of the time (process spawn, DeepSpeed's first initialize builds its
CPU comm op), so each world size is started once per test session and runs every scenario in
:mod:`_scenarios` that the tests ask for; each scenario's per-rank result (or its exception) comes
back in a dict.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import logging

    import deepspeed
    import deepspeed.ops

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's CPU shared-memory all-reduce is JIT-built (minutes when the cache is cold) and
    # leaves a 66 MiB /dev/shm buffer per rank and run behind; gloo does the collectives here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    import _scenarios

    for name in names:
        workdir = os.path.join(outdir, f"work-{name}")
        os.makedirs(workdir, exist_ok=True)
        try:
            out = {"ok": getattr(_scenarios, name)(rank, world, workdir)}
        except BaseException as err:  # noqa: BLE001 - reported to the test, which decides
            out = {"error": f"{type(err).__name__}: {err}", "type": type(err).__name__,
                   "traceback": traceback.format_exc()}
        torch.save(out, os.path.join(outdir, f"{name}.{rank}.pt"))
        # DeepSpeed keeps the last engine's mpu in a module global; the next scenario must not see it.
        from deepspeed.utils import groups

        groups.mpu = None
        torch.distributed.barrier()


def run_world(world: int, names: list[str], *, timeout: float = 300) -> dict[str, list[dict]]:
    """Run the named scenarios on ``world`` ranks; ``{name: [per-rank {"ok": ...} or {"error": ...}]}``."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env_path = os.pathsep.join([here, root, os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = env_path  # spawned children import _scenarios and muon_megatron
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), outdir, names), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} DeepSpeed ranks did not finish in {timeout} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        results = {}
        for name in names:
            per_rank = []
            for rank in range(world):
                path = os.path.join(outdir, f"{name}.{rank}.pt")
                per_rank.append(torch.load(path, weights_only=False) if os.path.exists(path) else {"error": "no result"})
            results[name] = per_rank
        return results


def ok(results: dict, name: str) -> list:
    """The per-rank results of scenario ``name``; fails with the first rank's traceback otherwise."""
    per_rank = results[name]
    for rank, out in enumerate(per_rank):
        if "ok" not in out:
            raise AssertionError(f"scenario {name} failed on rank {rank}:\n{out.get('traceback', out['error'])}")
    return [out["ok"] for out in per_rank]
