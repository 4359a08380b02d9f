"""Spawn gloo worlds on 127.0.0.1 that run megatron-core on the CPU (tests only).

``run_world(fn, world_size, *args)`` starts ``world_size`` processes, each of which activates the
CPU shim, joins a gloo process group and calls ``fn(rank, world_size, *args)``. It returns the list
of the workers' return values (rank order) and re-raises the first worker failure with its
traceback. ``fn`` must be a module-level function (it is pickled by name).
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch.multiprocessing as mp

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _HERE not in sys.path:  # the spawned workers import cpu_shim and the worker modules by name
    sys.path.insert(0, _HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    try:
        for path in (_ROOT, _HERE):
            if path not in sys.path:
                sys.path.insert(0, path)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            CUDA_DEVICE_MAX_CONNECTIONS="1",
        )
        import warnings

        import torch

        warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's no-TE/no-Apex notices
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.set_num_threads(1)
        import cpu_shim

        cpu_shim.activate()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            _teardown()
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, then exit
        queue.put((rank, "error", traceback.format_exc()))


def _teardown():
    import torch

    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:  # pragma: no cover - cleanup only
        pass
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_world(fn, world_size: int, *args, timeout: float = 300.0, attempts: int = 3):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return results.
    Retries (new port) when the rendezvous port was taken meanwhile by another process."""
    for attempt in range(attempts):
        try:
            return _run_world_once(fn, world_size, args, timeout)
        except RuntimeError as err:
            if "EADDRINUSE" not in str(err) or attempt == attempts - 1:
                raise


def _run_world_once(fn, world_size, args, timeout):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            (results if status == "ok" else errors)[rank] = payload
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
