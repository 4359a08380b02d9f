"""The demo's data: the Python standard library's own sources as bytes, and the lr schedule.

The corpus is this interpreter's top-level ``.py`` standard-library files (never downloaded):
every tenth file (sorted by name) is held out for validation. Both optimizers see the same
batches and the same schedule.
"""

from __future__ import annotations

import math
import os
import pathlib
import sysconfig

import torch


def stdlib_source_files() -> list[pathlib.Path]:
    """The standard library's top-level ``.py`` files of this interpreter, sorted by name."""
    candidates = [sysconfig.get_paths().get("stdlib"), os.path.dirname(os.__file__)]
    for folder in candidates:
        if folder and pathlib.Path(folder).is_dir():
            files = sorted(pathlib.Path(folder).glob("*.py"))
            if files:
                return files
    raise FileNotFoundError(
        f"no standard-library .py sources found in {candidates}; this Python installation ships none "
        "(some minimal images strip them)"
    )


def load_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train and validation byte tensors (uint8) from the stdlib sources, at most ``max_bytes`` in all."""
    files = stdlib_source_files()
    train, val, used, total = [], [], 0, 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        if total + len(data) > max_bytes:
            data = data[: max(0, max_bytes - total)]
        if not data:
            break
        (val if i % 10 == 9 else train).append(data)
        total += len(data)
        used += 1
    train_bytes, val_bytes = b"\n".join(train), b"\n".join(val)
    if not val_bytes:  # a tiny --max-bytes: hold out the tail instead
        cut = int(len(train_bytes) * 0.9)
        train_bytes, val_bytes = train_bytes[:cut], train_bytes[cut:]
    info = {"source": str(files[0].parent), "files": used, "train_bytes": len(train_bytes), "val_bytes": len(val_bytes)}
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train_bytes), as_tensor(val_bytes), info


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` bytes, as int64 tokens."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % (the same schedule for both optimizers)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
