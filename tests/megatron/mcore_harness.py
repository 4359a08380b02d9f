"""Spawn worlds on 127.0.0.1 that run megatron-core: gloo on the CPU, or NCCL on GPUs (tests only).

``run_world(fn, world_size, *args)`` starts ``world_size`` processes, each of which activates the
CPU shim, joins a gloo process group and calls ``fn(rank, world_size, *args)``. It returns the list
of the workers' return values (rank order) and re-raises the first worker failure with its
traceback. ``fn`` must be a module-level function (it is pickled by name).

``backend="nccl"`` runs the same workers with one rank per GPU (``torch.cuda.set_device(rank)``), no
CPU shim, an NCCL process group, and ``place_inputs`` on: the helpers of :mod:`mcore_models` build
models and batches on the CPU and the parity workers load reference weights there, so in that mode
models go to the rank's GPU (as ``megatron.training`` does with ``model.cuda()``), batches follow,
reference files load onto the GPU, and Megatron's CUDA RNG tracker is seeded after the parallel state
is initialised (as ``megatron.training`` does; the CPU shim makes it a no-op). ``tests/gpu`` runs the
parity scenarios this way; ``place_inputs=True`` with gloo runs that code path on the CPU.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import sys
import traceback

import torch.multiprocessing as mp

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _HERE not in sys.path:  # the spawned workers import cpu_shim and the worker modules by name
    sys.path.insert(0, _HERE)


BACKENDS = ("gloo", "nccl")
#: Set in every NCCL worker: NVLink multicast (NCCL's NVLS, PyTorch's symmetric-memory multicast,
#: NVSHMEM's NVLS) stays off on the shared GPU hosts these runs target.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: A rank that fails inside a collective leaves the others waiting; NCCL gives up after this long.
NCCL_TIMEOUT = datetime.timedelta(seconds=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, backend="gloo", place_inputs=False):
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
        if backend == "nccl":
            os.environ.update(NCCL_ENV)
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
            torch.distributed.init_process_group("nccl", rank=rank, world_size=world_size, timeout=NCCL_TIMEOUT)
        else:
            import cpu_shim

            cpu_shim.activate()
            device = torch.device("cpu")
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        if place_inputs:
            _place_inputs_on(device)
        try:
            result = fn(rank, world_size, *args)
        finally:
            _teardown()
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, then exit
        queue.put((rank, "error", traceback.format_exc()))


def _place_inputs_on(device):
    """Models and batches of :mod:`mcore_models` on ``device``, reference files loaded there, and the
    CUDA RNG tracker seeded after each ``initialize_model_parallel`` (see the module docstring)."""
    import torch

    import mcore_models
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.moe import moe_utils

    build_gpt, local_batch, load = mcore_models.build_gpt, mcore_models.local_batch, torch.load
    initialize = parallel_state.initialize_model_parallel

    @functools.wraps(build_gpt)
    def build_gpt_on_device(*args, **kwargs):
        return build_gpt(*args, **kwargs).to(device)

    @functools.wraps(local_batch)
    def local_batch_on_device(*args, **kwargs):
        return local_batch(*args, **kwargs).to(device)

    @functools.wraps(load)
    def load_onto_device(f, map_location=None, *args, **kwargs):
        # only files named by path: dist_checkpointing's in-memory loads keep their own placement
        if map_location is None and isinstance(f, (str, os.PathLike)):
            map_location = device
        return load(f, map_location, *args, **kwargs)

    @functools.wraps(initialize)
    def initialize_and_seed(*args, **kwargs):
        out = initialize(*args, **kwargs)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)  # dropout is 0: only the tracker must exist
        return out

    mcore_models.build_gpt, mcore_models.local_batch = build_gpt_on_device, local_batch_on_device
    torch.load = load_onto_device
    parallel_state.initialize_model_parallel = initialize_and_seed
    if not hasattr(moe_utils, "te_general_gemm"):  # as in cpu_shim: megatron-core 0.16 without TE
        moe_utils.te_general_gemm = None


def _teardown():
    import torch

    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:  # pragma: no cover - cleanup only
        pass
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_world(fn, world_size: int, *args, timeout: float = 300.0, attempts: int = 3, backend: str = "gloo",
              place_inputs: bool | None = None):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results.
    Retries (new port) when the rendezvous port was taken meanwhile by another process.

    backend: "gloo" (CPU shim, the CPU suite) or "nccl" (one rank per GPU, no shim).
    place_inputs: put models, batches and reference loads on the rank's device (see the module
    docstring); default on with "nccl", off with "gloo"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {BACKENDS}")
    if backend == "nccl":
        import torch

        if torch.cuda.device_count() < world_size:
            raise RuntimeError(f"backend 'nccl' runs one rank per GPU: {world_size} ranks, "
                               f"{torch.cuda.device_count()} GPUs visible")
        os.environ.update(NCCL_ENV)  # inherited by the spawned ranks
    if place_inputs is None:
        place_inputs = backend == "nccl"
    for attempt in range(attempts):
        try:
            return _run_world_once(fn, world_size, args, timeout, backend, place_inputs)
        except RuntimeError as err:
            if "EADDRINUSE" not in str(err) or attempt == attempts - 1:
                raise


def _run_world_once(fn, world_size, args, timeout, backend="gloo", place_inputs=False):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, backend, place_inputs),
                    daemon=False)
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
