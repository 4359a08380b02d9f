"""Spawned process worlds for the multi-GPU benchmarks (``two_gpu.py``, ``scale_projection.py``).

- :func:`run_world` starts ``world`` processes (spawn), one rank per GPU with NCCL or gloo ranks on
  the CPU, calls ``fn(rank, world, *args)`` in each, and waits at most ``timeout`` seconds. It
  never raises for a failed world: it returns ``(ok, message)`` so that the caller records the
  failure and goes on with the next run. On a timeout it kills the processes it started.
- :data:`NCCL_ENV`: set in every process (parent and ranks) before NCCL starts. NVLink SHARP
  multicast is off on the lent machines (``/work/.library/device/KINDS.md``).
- :class:`CollectiveBytes`: counts the bytes this rank sends in ``torch.distributed`` collectives
  while it is switched on (ring-algorithm counts, stated in its docstring). Install it before
  megatron-core is imported: megatron-core binds some collectives to module names at import time.
"""

from __future__ import annotations

import functools
import inspect
import os
import socket
import sys
import time
import traceback
from collections import defaultdict
from datetime import timedelta

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(*parts) -> None:
    print(*parts, flush=True)


def set_process_env() -> None:
    """The NCCL settings and the repository on ``PYTHONPATH`` (spawned ranks inherit both)."""
    os.environ.update(NCCL_ENV)
    path = os.environ.get("PYTHONPATH", "")
    if ROOT not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, path) if p)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, world, port, cuda, args):
    set_process_env()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), CUDA_DEVICE_MAX_CONNECTIONS="1")
    if cuda:
        torch.cuda.set_device(rank)
    fn(rank, world, *args)


def init_process_group(rank: int, world: int, cuda: bool, timeout_s: float = 300.0) -> None:
    """NCCL with this rank's GPU, or gloo on the CPU. A peer that fails makes the others' next
    collective fail after ``timeout_s`` instead of hanging."""
    kwargs = dict(backend="nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    if cuda:
        kwargs["device_id"] = torch.device("cuda", rank)
    torch.distributed.init_process_group(**kwargs)


def run_world(fn, world: int, args: tuple, *, cuda: bool, timeout: float) -> tuple[bool, str]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; ``(True, "")`` when every rank
    returned, else ``(False, what happened)`` (the failing rank's traceback, or the timeout)."""
    import torch.multiprocessing as mp

    set_process_env()
    context = mp.start_processes(_rank_main, args=(fn, world, free_port(), cuda, args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                for p in context.processes:
                    p.join(10)
                return False, f"timed out after {timeout:.0f} s"
    except Exception as err:  # a rank raised or died: join() has stopped the others
        return False, _short(str(err))
    return True, ""


def _short(text: str, lines: int = 25) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


def error_text() -> str:
    return _short(traceback.format_exc())


class CollectiveBytes:
    """Bytes this rank sends per collective while :attr:`active` (ring-algorithm counts, ``p`` the
    group size, ``b`` the bytes of this rank's input): all-reduce ``2 (p - 1) / p * b``; all-gather
    ``(p - 1) * b``; reduce-scatter ``(p - 1) / p * b`` (``b`` the full input); all-to-all ``b``
    minus this rank's own split; broadcast ``b`` on the source. Groups of one rank send nothing.
    ``by_op`` sums per collective name; ``calls`` counts calls."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor",
             "_reduce_scatter_base", "reduce_scatter", "all_to_all_single", "all_to_all", "broadcast")

    def __init__(self):
        self.active = False
        self.by_op: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._installed = False

    def install(self) -> "CollectiveBytes":
        import torch.distributed as dist

        if self._installed:
            return self
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(name, original))
        self._installed = True
        return self

    def reset(self) -> None:
        self.by_op.clear()
        self.calls.clear()

    @property
    def total(self) -> float:
        return float(sum(self.by_op.values()))

    def _wrap(self, name, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self.active:
                try:
                    self._count(name, signature.bind(*args, **kwargs).arguments)
                except Exception:  # noqa: BLE001 - counting must never break the collective
                    pass
            return original(*args, **kwargs)

        return counted

    def _count(self, name: str, a: dict) -> None:
        import torch.distributed as dist

        group = a.get("group")
        p = dist.get_world_size(group)
        if p <= 1:
            return

        def nbytes(t):
            return t.numel() * t.element_size()

        if name == "all_reduce":
            sent = 2 * (p - 1) / p * nbytes(a["tensor"])
        elif name == "all_gather":
            sent = (p - 1) * nbytes(a["tensor"])
        elif name in ("all_gather_into_tensor", "_all_gather_base"):
            sent = (p - 1) * nbytes(a["input_tensor"] if "input_tensor" in a else a["input"])
        elif name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
            sent = (p - 1) / p * nbytes(a["input"])
        elif name == "reduce_scatter":
            sent = (p - 1) / p * sum(nbytes(t) for t in a["input_list"])
        elif name == "all_to_all_single":
            x = a["input"]
            splits = a.get("input_split_sizes")
            me = dist.get_rank(group)
            if splits:
                row = nbytes(x) // max(1, x.shape[0]) if x.dim() else 0
                sent = nbytes(x) - int(list(splits)[me]) * row
            else:
                sent = nbytes(x) * (p - 1) / p
        elif name == "all_to_all":
            me = dist.get_rank(group)
            sent = sum(nbytes(t) for i, t in enumerate(a["input_tensor_list"]) if i != me)
        elif name == "broadcast":
            sent = nbytes(a["tensor"]) if dist.get_rank() == a.get("src") else 0
        else:
            return
        self.by_op[name] += sent
        self.calls[name] += 1


class StepTimer:
    """Elapsed seconds between marks: CUDA events on a GPU (read after a synchronize), wall clock
    on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1e3
        return end - start


def median(values) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])
