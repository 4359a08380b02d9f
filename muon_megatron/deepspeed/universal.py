"""Universal checkpoints for muon_megatron's DeepSpeed Muon (ZeRO-1/2/3, no tensor parallelism).

DeepSpeed's ``ds_to_universal`` extracts the Adam keys ``exp_avg`` and ``exp_avg_sq`` of every
param group by name, so it cannot convert a checkpoint whose Muon groups hold ``momentum_buffer``
(the built-in Muon fails the same way, with ``KeyError: 'exp_avg'``). :func:`convert_to_universal`
writes the same universal layout from our checkpoints: per parameter a folder
``zero/<name>/`` with ``fp32.pt`` and one file per optimizer-state key (``momentum_buffer`` for
Muon parameters; ``exp_avg``, ``exp_avg_sq`` and ``step`` for AdamW ones), each the full
parameter-shaped tensor stitched from every data-parallel rank's fragment, plus
``zero/optimizer_state.pt`` (the param groups, DeepSpeed's global state and a ``"muon_megatron"``
marker) and the model-state files. Load it with ``"checkpoint": {"load_universal": true}`` at any
data-parallel size: at ZeRO-1/2 DeepSpeed's own universal loader reads whatever state keys the
folders hold; at ZeRO-3, whose DeepSpeed loader reads only Adam's keys, the loader
``muon_megatron.deepspeed.initialize`` installs on the ZeRO-3 optimizer does.

Where the fragments are: ZeRO-1/2 checkpoints carry DeepSpeed's fragment map
(``param_slice_mappings``). A ZeRO-3 rank's file holds one flat fp32 tensor per sub-group
(``fp32_flat_groups``), the concatenation, in the order of the model-state file's
``param_shapes[i]``, of each parameter's ZeRO-3 partition: ``ceil(numel / ranks)`` elements, rank r
holding elements ``[r * n, (r + 1) * n)`` of the flattened parameter (the last ranks pad). Our
optimizer state lists one tensor per sub-group in the same order.

    python -m muon_megatron.deepspeed.universal CHECKPOINT_DIR/TAG OUTPUT_DIR/TAG_universal

Refused with a message: checkpoints not written by muon_megatron (use DeepSpeed's
``ds_to_universal``), tensor- or pipeline-parallel checkpoints.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import shutil
from collections import defaultdict

import torch

logger = logging.getLogger(__name__)

_OPTIM_FILE = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _optim_files(checkpoint_dir: str) -> list[tuple[int, str]]:
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir, "*_optim_states.pt")):
        match = _OPTIM_FILE.match(os.path.basename(path))
        if match is None:
            continue
        dp, mp = int(match.group(1)), int(match.group(2))
        if mp != 0:
            raise NotImplementedError(
                f"{path}: tensor/pipeline-parallel checkpoints (mp_rank {mp}) are not supported by "
                "muon_megatron's universal conversion yet"
            )
        found.append((dp, path))
    if not found:
        raise FileNotFoundError(f"no ZeRO optimizer files (*zero_pp_rank_*_optim_states.pt) in {checkpoint_dir}")
    return sorted(found)


def _param_shape_groups(checkpoint_dir: str) -> list[dict]:
    """``param_shapes`` of a model-state file: per ZeRO group (ZeRO-3: sub-group), name -> shape,
    in flat order (every rank's file holds the same)."""
    for path in sorted(glob.glob(os.path.join(checkpoint_dir, "*_model_states.pt"))):
        shapes = torch.load(path, map_location="cpu", weights_only=False).get("param_shapes")
        if shapes:  # MoE expert files hold none
            return list(shapes)
    raise FileNotFoundError(f"no *_model_states.pt with param_shapes in {checkpoint_dir}")


def _base_state(path: str, optim: dict, key: str) -> dict:
    base = optim.get(key)
    if not isinstance(base, dict) or "muon_megatron" not in base:
        raise ValueError(
            f"{path} was not written by muon_megatron's DeepSpeed Muon; convert it with DeepSpeed's "
            "ds_to_universal instead"
        )
    return base


def _group_state(state: dict, index: int) -> dict:
    return state.get(index, state.get(str(index), {}))


def _zero12_fragments(files, fragments: dict, steps: dict) -> tuple[dict, dict]:
    """Fill ``fragments`` / ``steps`` from ZeRO-1/2 files; return (first rank's file, its base state)."""
    first = None
    for _, path in files:
        optim = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = _base_state(path, optim, "base_optimizer_state")
        first = first or (optim, base)
        for group_index, mapping in enumerate(optim["param_slice_mappings"]):
            flat_state = {"fp32": optim["single_partition_of_fp32_groups"][group_index]}
            group_state = _group_state(base["state"], group_index)
            for key, value in group_state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    flat_state[key] = value.view(-1)
            for name, fragment in mapping.items():
                start, numel = int(fragment.start), int(fragment.numel)
                for key, flat in flat_state.items():
                    fragments[name][key].append(flat.narrow(0, start, numel).clone())
                if "step" in group_state:
                    steps[name] = group_state["step"]
    return first


def _zero3_fragments(files, shape_groups: list[dict], fragments: dict, steps: dict) -> tuple[dict, dict]:
    """Fill ``fragments`` / ``steps`` from ZeRO-3 files (see module doc); return (first rank's
    file, its base state)."""
    world = len(files)
    first = None
    for rank, path in files:
        optim = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = _base_state(path, optim, "optimizer_state_dict")
        first = first or (optim, base)
        flats = optim["fp32_flat_groups"]
        if int(optim.get("partition_count", world)) != world or len(flats) != len(shape_groups):
            raise ValueError(
                f"{path}: {len(flats)} ZeRO-3 sub-groups over {optim.get('partition_count')} ranks, but the folder has "
                f"{world} rank files and {len(shape_groups)} sub-groups of parameter shapes"
            )
        numels = [n for g in base["muon_megatron"]["groups"] for n in g["numel"]]
        if numels != [int(f.numel()) for f in flats]:
            raise ValueError(f"{path}: optimizer tensors of {numels} elements do not match the sub-groups "
                             f"{[int(f.numel()) for f in flats]}")
        for index, (flat, shapes) in enumerate(zip(flats, shape_groups)):
            group_state = _group_state(base["state"], index)
            flat_state = {"fp32": flat.view(-1)}
            for key, value in group_state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    flat_state[key] = value.view(-1)
            offset = 0
            for name, shape in shapes.items():
                numel = torch.Size(shape).numel()
                size = -(-numel // world)
                held = max(0, min(size, numel - rank * size))
                for key, values in flat_state.items():
                    fragments[name][key].append(values.narrow(0, offset, held).clone())
                if "step" in group_state:
                    steps[name] = group_state["step"]
                offset += size
            if offset != flat.numel():
                raise ValueError(f"{path}: sub-group {index} holds {flat.numel()} elements, its parameters {offset}")
    return first


def convert_to_universal(checkpoint_dir: str, output_dir: str) -> None:
    """Write the universal checkpoint of ``checkpoint_dir`` (one tag folder) to ``output_dir``."""
    files = _optim_files(checkpoint_dir)
    if [dp for dp, _ in files] != list(range(len(files))):
        raise ValueError(f"{checkpoint_dir}: data-parallel ranks {[dp for dp, _ in files]} are not 0..{len(files) - 1}")
    shape_groups = _param_shape_groups(checkpoint_dir)
    shapes = {name: shape for group in shape_groups for name, shape in group.items()}
    # DeepSpeed's BF16_Optimizer writes no zero_stage; its files are laid out as ZeRO-1's
    first_file = torch.load(files[0][1], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    stage = int(first_file.get("zero_stage", 1))
    del first_file
    fragments: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    steps: dict[str, torch.Tensor] = {}
    if stage in (1, 2):
        first, base = _zero12_fragments(files, fragments, steps)
        sharded = {"base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups"}
    elif stage == 3:
        first, base = _zero3_fragments(files, shape_groups, fragments, steps)
        sharded = {"optimizer_state_dict", "fp32_flat_groups"}
    else:
        raise ValueError(f"{files[0][1]}: ZeRO stage {stage} has no partitions to convert")
    zero_dir = os.path.join(output_dir, "zero")
    os.makedirs(zero_dir, exist_ok=True)
    for name, by_key in fragments.items():
        shape = shapes.get(name)
        if shape is None:
            raise ValueError(f"parameter {name!r} has optimizer state but no shape in the model-state files")
        folder = os.path.join(zero_dir, name)
        os.makedirs(folder, exist_ok=True)
        for key, pieces in by_key.items():
            full = torch.cat(pieces)
            if full.numel() != torch.Size(shape).numel():
                raise ValueError(f"{name}/{key}: fragments hold {full.numel()} elements, shape {tuple(shape)} needs "
                                 f"{torch.Size(shape).numel()}")
            torch.save({"param": full.view(shape)}, os.path.join(folder, f"{key}.pt"))
        if name in steps:
            torch.save(steps[name], os.path.join(folder, "step.pt"))
    common = {k: v for k, v in first.items() if k not in sharded}
    common["param_groups"] = base["param_groups"]
    common["muon_megatron"] = base["muon_megatron"]
    torch.save(common, os.path.join(zero_dir, "optimizer_state.pt"))
    for path in glob.glob(os.path.join(checkpoint_dir, "*_model_states.pt")):
        shutil.copy(path, os.path.join(output_dir, os.path.basename(path)))
    logger.info("muon_megatron: universal checkpoint of %d parameters from %d DP ranks (ZeRO-%d) written to %s",
                len(fragments), len(files), stage, output_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert a muon_megatron DeepSpeed ZeRO-1/2/3 checkpoint to universal")
    parser.add_argument("input", help="the checkpoint's tag folder (holding *_optim_states.pt)")
    parser.add_argument("output", help="the universal tag folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    convert_to_universal(args.input, args.output)


if __name__ == "__main__":
    main()
