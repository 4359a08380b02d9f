"""Where a process group's collectives take their tensors.

gloo reduces CPU tensors; NCCL only CUDA tensors ("No backend type associated with device type
cpu"). Every small control collective of this package (a finiteness flag, a count, the RMS report)
and every buffer of a rank that holds nothing this step is made on :func:`collective_device`, so the
same code runs on a CPU gloo group and a GPU NCCL group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _backend_devices(group) -> Optional[set[str]]:
    """The device types ``group``'s backend takes (``{"cpu", "cuda"}`` for gloo, ``{"cuda"}`` for
    NCCL), or None when torch cannot say."""
    get_config = getattr(dist, "get_backend_config", None)
    if get_config is None:
        return None
    try:
        config = str(get_config(group))
    except (RuntimeError, ValueError):
        return None
    # "cpu:gloo,cuda:gloo", "cuda:nccl", "cpu:gloo,cuda:nccl", or a bare backend name
    if ":" not in config:
        return None
    return {entry.split(":", 1)[0].strip() for entry in config.split(",") if ":" in entry}


def collective_device(group=None) -> torch.device:
    """The device for tensors of collectives on ``group`` (the default group when None).

    CPU when the backend takes CPU tensors (gloo, mpi) or no process group is initialised; else the
    current CUDA device (NCCL). RuntimeError naming the backend when it takes neither here."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    devices = _backend_devices(group)
    if devices is None:
        name = str(dist.get_backend(group)).lower()
        devices = {"cpu", "cuda"} if name in ("gloo", "mpi", "ccl") else {"cuda"}
    if "cpu" in devices:
        return torch.device("cpu")
    if "cuda" in devices and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    raise RuntimeError(
        f"process group backend {dist.get_backend(group)!r} takes tensors on {sorted(devices)}, none of them usable "
        "here; use gloo for CPU runs, NCCL with CUDA"
    )


def any_rank(flag: bool, group=None) -> bool:
    """True when ``flag`` is true on any rank of ``group`` (one MAX all-reduce of one element on
    :func:`collective_device`); ``flag`` itself without an initialised process group. A
    collective: every rank of ``group`` must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item() > 0.0
