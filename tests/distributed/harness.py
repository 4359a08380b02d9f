"""Spawn gloo ranks on 127.0.0.1 and collect what each returns (tests only)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, outdir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, os.path.join(outdir, f"{rank}.pt"))
        dist.barrier()  # every rank done with its collectives before any leaves
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        torch.save({"error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
    # Leave without tearing gloo down: the destructors of its threads can abort a finished process
    # ("terminate called without an active exception", SIGABRT) about one run in a few dozen, on
    # a loaded machine. The result is on disk by now; the parent reads it, not the exit status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = 300):
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return the list of results.
    ``fn`` must be importable (module level). Any rank's exception is raised here with its traceback.
    A port taken between choosing it and binding it (another process on the machine) is retried."""
    for attempt in range(3):
        try:
            return _run_ranks_once(fn, world, args, timeout)
        except RuntimeError as err:
            if "ddress already in use" not in str(err) or attempt == 2:
                raise


def _run_ranks_once(fn, world: int, args: tuple, timeout: float):
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), outdir, fn, args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"{world} ranks did not finish in {timeout} s (a hang in a collective?)")
        results = []
        for rank in range(world):
            path = os.path.join(outdir, f"{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} returned nothing")
            out = torch.load(path, weights_only=False)
            if "error" in out:
                raise RuntimeError(f"rank {rank} failed:\n{out['error']}")
            results.append(out["ok"])
        return results
