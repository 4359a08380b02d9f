"""Spawn one DeepSpeed world (CPU accelerator, gloo, 127.0.0.1) and run many scenarios in it.

Starting a world costs most of the time (process spawn, DeepSpeed's first initialize builds its
CPU comm op), so each world size is started once per test session and runs every scenario in
:mod:`_scenarios` (or, for names not there, :mod:`_scenarios_zero3` or :mod:`_scenarios_qk_clip`)
that the tests ask for; each scenario's per-rank result (or its exception) comes back in a dict.

``backend="nccl"`` runs the same scenarios with DeepSpeed's CUDA accelerator, one rank per GPU, and
``place_inputs`` on: the scenarios' micro-batches and their count of orthogonalised matrices are made
on the CPU, so there they move to the rank's GPU (the engine moves the model itself). Results come
back on the CPU either way. ``tests/gpu`` runs the parity scenarios this way; ``place_inputs=True``
with gloo runs that code path on the CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

BACKENDS = ("gloo", "nccl")
#: Set in every NCCL rank: NVLink multicast (NCCL's NVLS, PyTorch's symmetric-memory multicast,
#: NVSHMEM's NVLS) stays off on the shared GPU hosts these runs target.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: A rank that fails inside a collective leaves the others waiting; NCCL gives up after this long.
NCCL_TIMEOUT = datetime.timedelta(seconds=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, names: list[str], backend: str = "gloo",
           place_inputs: bool = False, log: bool = False) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cuda" if backend == "nccl" else "cpu",
    )
    torch.set_num_threads(1)
    import logging

    import deepspeed
    import deepspeed.ops

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if backend == "nccl":
        os.environ.update(NCCL_ENV)
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        deepspeed.init_distributed(dist_backend="nccl", timeout=NCCL_TIMEOUT)
    else:
        # DeepSpeed's CPU shared-memory all-reduce is JIT-built (minutes when the cache is cold) and
        # leaves a 66 MiB /dev/shm buffer per rank and run behind; gloo does the collectives here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        device = torch.device("cpu")
        deepspeed.init_distributed(dist_backend="gloo")
    import _scenarios
    import _scenarios_qk_clip
    import _scenarios_zero3

    if place_inputs:
        _place_inputs_on(_scenarios, device)

    for name in names:
        workdir = os.path.join(outdir, f"work-{name}")
        os.makedirs(workdir, exist_ok=True)
        try:
            scenario = (getattr(_scenarios, name, None) or getattr(_scenarios_zero3, name, None)
                        or getattr(_scenarios_qk_clip, name))
            out = {"ok": scenario(rank, world, workdir)}
        except BaseException as err:  # noqa: BLE001 - reported to the test, which decides
            out = {"error": f"{type(err).__name__}: {err}", "type": type(err).__name__,
                   "traceback": traceback.format_exc()}
        torch.save(out, os.path.join(outdir, f"{name}.{rank}.pt"))
        if log:
            outcome = "ok" if "ok" in out else f"FAILED\n{out['traceback']}"
            sys.stdout.write(f"[deepspeed rank {rank}/{world}] {name}: {outcome}\n")  # one write: shared stream
            sys.stdout.flush()
        # DeepSpeed keeps the last engine's mpu in a module global; the next scenario must not see it.
        from deepspeed.utils import groups

        groups.mpu = None
        torch.distributed.barrier()


def _place_inputs_on(scenarios, device: torch.device) -> None:
    """The scenarios' micro-batches on ``device``, and their NS count summed there (NCCL reduces
    CUDA tensors only); the values are those of the CPU path."""
    import torch.distributed as dist

    micro_batch = scenarios.micro_batch

    def micro_batch_on_device(*args, **kwargs):
        return tuple(t.to(device) for t in micro_batch(*args, **kwargs))

    def world_total(self) -> int:
        t = torch.tensor([self.count], device=device)
        dist.all_reduce(t)
        return int(t.item())

    scenarios.micro_batch = micro_batch_on_device
    scenarios.CountNS.world_total = world_total


def run_world(world: int, names: list[str], *, timeout: float = 300, backend: str = "gloo",
              place_inputs: bool | None = None, log: bool = False) -> dict[str, list[dict]]:
    """Run the named scenarios on ``world`` ranks; ``{name: [per-rank {"ok": ...} or {"error": ...}]}``.

    backend: "gloo" (CPU accelerator, the CPU suite) or "nccl" (CUDA accelerator, one rank per GPU).
    place_inputs: put the scenarios' batches on the rank's device (see the module docstring);
    default on with "nccl", off with "gloo".
    log: each rank prints every scenario's outcome as it ends (a world that hangs later still
    leaves them in the log)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {BACKENDS}")
    if backend == "nccl":
        if torch.cuda.device_count() < world:
            raise RuntimeError(f"backend 'nccl' runs one rank per GPU: {world} ranks, "
                               f"{torch.cuda.device_count()} GPUs visible")
        os.environ.update(NCCL_ENV)  # inherited by the spawned ranks
    if place_inputs is None:
        place_inputs = backend == "nccl"
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env_path = os.pathsep.join([here, root, os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = env_path  # spawned children import _scenarios and muon_megatron
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), outdir, names, backend, place_inputs, log),
                                 nprocs=world, join=False, start_method="spawn")
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
                per_rank.append(torch.load(path, weights_only=False, map_location="cpu") if os.path.exists(path)
                                else {"error": "no result"})
            results[name] = per_rank
        return results


def ok(results: dict, name: str) -> list:
    """The per-rank results of scenario ``name``; fails with the first rank's traceback otherwise."""
    per_rank = results[name]
    for rank, out in enumerate(per_rank):
        if "ok" not in out:
            raise AssertionError(f"scenario {name} failed on rank {rank}:\n{out.get('traceback', out['error'])}")
    return [out["ok"] for out in per_rank]
