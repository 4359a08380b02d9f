"""Run megatron-core on the CPU with gloo, for tests only.

megatron-core assumes CUDA in a handful of places (device keywords, ``Tensor.cuda()``, type-name
checks, streams and events, the CUDA RNG tracker). :func:`activate` redirects exactly those, in the
calling process, so that tiny models train on the CPU. Facts about what needs redirecting are in
``shared/CPU_MEGATRON.md``.

Contract: this module is imported only by tests and by the test workers they spawn, never by the
``muon_megatron`` package (``tests/megatron/test_imports.py`` checks that). ``activate`` is
idempotent and must be called before megatron-core builds any model or optimizer. On a machine
with a GPU nothing here is needed; the package is tested there without it.
"""

from __future__ import annotations

import contextlib

import torch

_ACTIVE = False
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` and ``Event``: every method does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        # wait_stream, record_event, synchronize, ...: do nothing; return a null object so that
        # chains such as current_stream().record_event().synchronize() work.
        return lambda *args, **kwargs: _NullStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CpuDeviceMode(torch.overrides.TorchFunctionMode):
    """Rewrites a ``device`` keyword naming CUDA (or a bare device index) to ``"cpu"``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs:
        if self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return _ORIGINAL_TYPE(self)
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
        dtype = dtype.replace("torch.cuda.", "torch.")
    return _ORIGINAL_TYPE(self, dtype, non_blocking, **kwargs)


_ORIGINAL_TYPE = torch.Tensor.type
_MODE = None


def activate() -> None:
    """Redirect megatron-core's CUDA assumptions to the CPU in this process (idempotent)."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return
    _ACTIVE = True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None
    torch.cuda.set_device = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.zeros(16, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *args, **kwargs: None
    torch.cuda.manual_seed = lambda *args, **kwargs: None
    torch.cuda.manual_seed_all = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _tensor_type
    # torch's own Adam (Megatron's --optimizer adam) asks the accelerator whether a CUDA graph is
    # being captured; a CUDA build of torch with no GPU cannot answer.
    torch.optim.Optimizer._accelerator_graph_capture_health_check = lambda self: None

    # MoE dispatch passes split sizes as tensors (on a GPU they are host copies kept as tensors);
    # gloo's binding wants sequences of ints.
    original_all_to_all_single = torch.distributed.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original_all_to_all_single(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    torch.distributed.all_to_all_single = all_to_all_single

    # megatron-core 0.16's MoE router refers to Transformer Engine's GEMM without defining the name
    # when TE is absent.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    from megatron.core.tensor_parallel import random as tp_random

    tp_random.CudaRNGStatesTracker.fork = lambda self, *args, **kwargs: contextlib.nullcontext()
    tp_random.CudaRNGStatesTracker.add = lambda self, *args, **kwargs: None

    _MODE = _CpuDeviceMode()
    _MODE.__enter__()
