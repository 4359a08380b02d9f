"""Parallel layouts for the invariance tests, and the per-rank worker that runs them.

Every rank builds the same full parameters and gradients from one seed, holds its pieces as a
layout scheme says, runs ``DistributedMuon`` for a few steps and returns its pieces; the test
compares them with ``muon_megatron.Muon`` on the full matrices in one process.
"""

from __future__ import annotations

import hashlib
import random

import torch

import muon_megatron as mm
from muon_megatron.distributed import DistributedMuon, ParamLayout

STEPS = 3
LR, WD = 0.02, 0.1


def full_params() -> dict:
    """name -> (shape, split). Tall, wide, square, QKV, gate|up, expert stacks (3-D and columns)."""
    return {
        "wide": ((6, 20), mm.Whole()),
        "tall": ((24, 7), mm.Whole()),
        "square": ((16, 16), mm.Whole()),
        "qkv": ((24, 10), mm.FusedQKV(num_query_groups=2, q_per_group=2, head_dim=3)),
        "fc1": ((16, 9), mm.GateUp(num_shards=2)),
        "experts": ((4, 5, 6), mm.ExpertStack(4)),
        "experts_cols": ((5, 12), mm.ExpertStack(3, layout="columns")),
    }


def make_tensors(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(shape, generator=gen) for k, (shape, _) in full_params().items()}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(STEPS)]
    return params, grads


def _cuts(rng: random.Random, total: int, parts: int, *, minimum: int = 0) -> list[int]:
    """``parts + 1`` boundaries in ``[0, total]``, uneven and at arbitrary positions."""
    inner = sorted(rng.randint(minimum, total - minimum) for _ in range(parts - 1)) if total else [0] * (parts - 1)
    return [0] + inner + [total]


def view_shape(name):
    shape, split = full_params()[name]
    return split.view_shape(shape)


def scheme(kind: str, world: int, seed: int) -> list[list[tuple[str, tuple | None, tuple | None]]]:
    """Per rank, the pieces it holds: (param name, shard rect or None, flat range or None)."""
    rng = random.Random(seed * 1000 + world)
    names = list(full_params())
    per_rank = [[] for _ in range(world)]
    if kind == "replicated":
        for r in range(world):
            per_rank[r] = [(n, None, None) for n in names]
    elif kind == "zero1":
        sizes = [view_shape(n)[0] * view_shape(n)[1] for n in names]
        cuts = _cuts(rng, sum(sizes), world)
        pos = 0
        for n, size in zip(names, sizes):
            for r in range(world):
                lo, hi = max(pos, cuts[r]), min(pos + size, cuts[r + 1])
                if hi > lo:
                    per_rank[r].append((n, None, (lo - pos, hi - pos)))
            pos += size
    elif kind in ("tp", "tp_zero"):
        tp = world if kind == "tp" else 2
        dp = world // tp
        for i, n in enumerate(names):
            R, C = view_shape(n)
            dim = i % 2 if (R, C)[i % 2] >= tp else 1 - i % 2
            length = (R, C)[dim]
            cuts = [0] + sorted(rng.sample(range(1, length), tp - 1)) + [length]  # uneven, non-empty
            for t in range(tp):
                a, b = cuts[t], cuts[t + 1]
                rect = (a, 0, b - a, C) if dim == 0 else (0, a, R, b - a)
                flat = _cuts(rng, rect[2] * rect[3], dp)
                for d in range(dp):
                    if flat[d + 1] > flat[d]:
                        per_rank[t * dp + d].append((n, rect, (flat[d], flat[d + 1]) if dp > 1 else None))
    elif kind == "ep":
        # The expert stack is split over an expert-parallel group of min(world, E) ranks (uneven
        # when E does not divide); with more ranks, expert-data-parallel replicas hold copies.
        # Dense parameters are replicated on every rank.
        for n in names:
            shape, _ = full_params()[n]
            if n != "experts":
                for r in range(world):
                    per_rank[r].append((n, None, None))
                continue
            E, m, k = shape
            ep = min(world, E)
            bounds = [e * E // ep for e in range(ep + 1)]
            for r in range(world):
                lo, hi = bounds[r % ep], bounds[r % ep + 1]
                per_rank[r].append((n, (lo * m, 0, (hi - lo) * m, k), None))
    else:
        raise ValueError(kind)
    return per_rank


def reference(seed: int, ns_dtype) -> dict:
    """Single-process Muon on the full matrices: the parameters after STEPS steps."""
    params, grads = make_tensors(seed)
    specs = full_params()
    groups = {}
    for n, p in params.items():
        groups.setdefault(specs[n][1], []).append(p)
    opt = mm.Muon([{"params": ps, "split": s} for s, ps in groups.items()], lr=LR, weight_decay=WD,
                  ns_dtype=ns_dtype)
    for g in grads:
        for n, p in params.items():
            p.grad = g[n].clone()
        opt.step()
    return params


def _local(full: torch.Tensor, split, rect, rng_):
    view = full.reshape(split.view_shape(full.shape))
    if rect is not None:
        r, c, h, w = rect
        view = view[r : r + h, c : c + w]
    flat = view.contiguous().view(-1)
    if rng_ is not None:
        flat = flat[rng_[0] : rng_[1]]
    return flat.clone()


def worker(rank: int, world: int, kind: str, seed: int, ns_dtype_name: str, pipeline: bool = False):
    """Run DistributedMuon on this rank's pieces; return pieces, plan digest, NS counts. With
    ``pipeline``, the exchange runs one stage per chunk of at most two matrices (many stages)."""
    ns_dtype = getattr(torch, ns_dtype_name)
    params, grads = make_tensors(seed)
    specs = full_params()
    pieces = scheme(kind, world, seed)[rank]
    # All pieces of this rank in one flat buffer (as a ZeRO partition), plus, for TP-only layouts,
    # one tensor per piece: both tensor shapes are exercised.
    flat_parts, layouts, offset = [], [], 0
    for n, rect, rng_ in pieces:
        shape, split = specs[n]
        layout = ParamLayout(n, shape, split, rect, rng_)
        flat_parts.append(_local(params[n], split, rect, rng_))
        layouts.append((layout, offset))
        offset += layout.numel
    if kind == "tp":
        tensors = [t.clone() for t in flat_parts]
        group = {"params": tensors, "layouts": [[(lay, 0)] for lay, _ in layouts]}
    else:
        buffer = torch.cat(flat_parts) if flat_parts else torch.zeros(0)
        tensors = [buffer]
        group = {"params": tensors, "layouts": [layouts]}
    opt = DistributedMuon([group], lr=LR, weight_decay=WD, ns_dtype=ns_dtype, pipeline_exchange=pipeline,
                          **({"max_batch": 2} if pipeline else {}))
    assert opt.exchange.stages > 1 or not pipeline or len(opt.plan.owned(rank)) <= 2
    counts = []
    for g in grads:
        gparts = [_local(g[n], specs[n][1], rect, rng_) for n, rect, rng_ in pieces]
        if kind == "tp":
            for t, gp in zip(tensors, gparts):
                t.grad = gp
        else:
            tensors[0].grad = torch.cat(gparts) if gparts else torch.zeros(0)
        opt.step()
        counts.append(list(opt.exchange.orthogonalized))
    if kind == "tp":
        out = [t.clone() for t in tensors]
    else:
        out = list(torch.split(tensors[0], [lay.numel for lay, _ in layouts]))
    digest = hashlib.sha256(repr(opt.plan).encode()).hexdigest()
    return {"pieces": [(n, rect, rng_, t) for (n, rect, rng_), t in zip(pieces, out)], "plan": digest,
            "orthogonalized": counts, "matrices": [m.name for m in opt.plan.matrices]}


def expected_piece(ref: dict, name: str, rect, rng_) -> torch.Tensor:
    return _local(ref[name], full_params()[name][1], rect, rng_)


def worker_all(rank: int, world: int, kinds: list, seed: int, ns_dtype_name: str, pipeline: bool = False):
    """All layout kinds in one process group (one spawn per world size keeps the suite fast)."""
    return {kind: worker(rank, world, kind, seed, ns_dtype_name, pipeline) for kind in kinds}
