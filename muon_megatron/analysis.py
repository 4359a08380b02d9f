"""``muon-megatron analyze``: how diverse the singular values of trained weight matrices are.

The Moonlight paper compares Muon- and AdamW-trained models by the entropy of each weight matrix's
normalised singular-value spectrum and finds Muon's higher (more directions used). Here, for a
matrix with singular values ``s_1..s_r`` (``r = min(m, n)``), ``p_i = s_i^2 / sum_j s_j^2`` and

    H(W) = -sum_i p_i log p_i / log r        in [0, 1]; 1 = every direction equally strong.

Matrices: every tensor of 2 or more dimensions that Moonlight's routing rule sends to Muon
(:func:`muon_megatron.core.is_muon_parameter`: not embeddings or the output head); a 3-D tensor is a
stack of experts, each its own matrix. Fused weights (gate|up, QKV) are analysed as stored.
Matrices are grouped by name with layer and expert indices replaced by ``*``; a group's entropy
is the mean over its matrices.

Checkpoints: a ``torch.save`` file holding a state dict (or a dict with it under ``model``,
``state_dict`` or ``module``, as Megatron's legacy and DeepSpeed's files do), or a
``torch.distributed.checkpoint`` folder (converted in memory with torch's ``dcp_to_torch_save``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from typing import Mapping

import torch

from .core.routing import is_muon_parameter


def svd_entropy(W: torch.Tensor) -> float:
    """Normalised entropy of ``W``'s squared singular values (module docstring); float64 SVD."""
    s = torch.linalg.svdvals(W.detach().to(torch.float64))
    r = s.numel()
    if r < 2:
        return 1.0
    p = s.square() / s.square().sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(r))


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or distributed-checkpoint folder, by name (flattened)."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise ValueError(f"{path} is a folder without a torch.distributed.checkpoint .metadata file")
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            target = os.path.join(tmp, "converted.pt")
            dcp_to_torch_save(path, target)
            obj = torch.load(target, map_location="cpu", weights_only=False)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    out: dict[str, torch.Tensor] = {}
    _flatten(obj, "", out)
    if not out:
        raise ValueError(f"{path} holds no tensors")
    return out


def _flatten(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def group_name(name: str) -> str:
    """``decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight`` ->
    ``decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight``."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", name)


def analyze_state_dict(state: Mapping[str, torch.Tensor], *, max_matrices_per_group: int = 64) -> dict[str, dict]:
    """Per group: mean, min and max SVD entropy and the number of matrices analysed (at most
    ``max_matrices_per_group``, taken evenly through the group, to bound the SVD time)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.ndim < 2 or not is_muon_parameter(name, t):
            continue
        mats = [t] if t.ndim == 2 else list(t.reshape(-1, *t.shape[-2:]))
        groups.setdefault(group_name(name), []).extend(mats)
    out = {}
    for g, mats in sorted(groups.items()):
        stride = max(1, len(mats) // max_matrices_per_group)
        values = [svd_entropy(m) for m in mats[::stride][:max_matrices_per_group]]
        out[g] = dict(mean=sum(values) / len(values), min=min(values), max=max(values), matrices=len(values),
                      shape=list(mats[0].shape))
    if not out:
        raise ValueError("no Muon matrices found (every tensor is 1-D, an embedding or the output head)")
    return out


def _short(group: str, width: int = 48) -> str:
    return group if len(group) <= width else "..." + group[-(width - 3):]


def format_table(results: Mapping[str, Mapping[str, dict]]) -> str:
    labels = list(results)
    groups = sorted({g for r in results.values() for g in r})
    lines = [f"{'matrix group':48s} " + " ".join(f"{l[:12]:>12s}" for l in labels)]
    for g in groups:
        cells = [f"{results[l][g]['mean']:12.4f}" if g in results[l] else f"{'-':>12s}" for l in labels]
        lines.append(f"{_short(g):48s} " + " ".join(cells))
    overall = [sum(r[g]["mean"] for g in r) / len(r) for r in results.values()]
    lines.append(f"{'mean over groups':48s} " + " ".join(f"{v:12.4f}" for v in overall))
    return "\n".join(lines)


def plot(results: Mapping[str, Mapping[str, dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    groups = sorted({g for r in results.values() for g in r})
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) + 2), 4.5))
    for i, label in enumerate(labels):
        xs = [j + i * width for j, g in enumerate(groups) if g in results[label]]
        ys = [results[label][g]["mean"] for g in groups if g in results[label]]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([_short(g, 40) for g in groups], rotation=60, ha="right", fontsize=7)
    lo = min(r[g]["min"] for r in results.values() for g in r)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel("SVD entropy (normalised)")
    ax.set_title("Singular-value entropy of weight matrices")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files or torch.distributed.checkpoint folders")
    parser.add_argument("--labels", nargs="+", help="one label per checkpoint (default: file names)")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart of the group means")
    parser.add_argument("--json", metavar="FILE", help="write the per-group figures as JSON")
    parser.add_argument("--max-matrices-per-group", type=int, default=64, help="bound on SVDs per group (default 64)")


def run(args: argparse.Namespace) -> int:
    labels = args.labels or [os.path.basename(os.path.normpath(c)) for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        print("muon-megatron analyze: error: give one --labels entry per checkpoint", file=sys.stderr)
        return 2
    results = {}
    for label, path in zip(labels, args.checkpoints):
        try:
            results[label] = analyze_state_dict(load_state_dict(path), max_matrices_per_group=args.max_matrices_per_group)
        except (OSError, ValueError, RuntimeError) as err:
            print(f"muon-megatron analyze: error: {path}: {err}", file=sys.stderr)
            return 2
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot(results, args.plot)
    return 0
