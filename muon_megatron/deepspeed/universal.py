"""Universal checkpoints for muon_megatron's DeepSpeed Muon (ZeRO-1/2, no tensor parallelism).

DeepSpeed's ``ds_to_universal`` extracts the Adam keys ``exp_avg`` and ``exp_avg_sq`` of every
param group by name, so it cannot convert a checkpoint whose Muon groups hold ``momentum_buffer``
(the built-in Muon fails the same way, with ``KeyError: 'exp_avg'``). :func:`convert_to_universal`
writes the same universal layout from our checkpoints: per parameter a folder
``zero/<name>/`` with ``fp32.pt`` and one file per optimizer-state key (``momentum_buffer`` for
Muon parameters; ``exp_avg``, ``exp_avg_sq`` and ``step`` for AdamW ones), each the full
parameter-shaped tensor stitched from every data-parallel rank's fragment, plus
``zero/optimizer_state.pt`` and the model-state files. DeepSpeed's own universal loader
(``"checkpoint": {"load_universal": true}``) then loads it at any data-parallel size: it reads
whatever state keys the folders hold.

    python -m muon_megatron.deepspeed.universal CHECKPOINT_DIR/TAG OUTPUT_DIR/TAG_universal

Refused with a message: checkpoints not written by muon_megatron (use DeepSpeed's
``ds_to_universal``), tensor- or pipeline-parallel checkpoints, ZeRO-3.
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
        raise FileNotFoundError(f"no ZeRO-1/2 optimizer files (*zero_pp_rank_*_optim_states.pt) in {checkpoint_dir}")
    return sorted(found)


def _param_shapes(checkpoint_dir: str) -> dict[str, torch.Size]:
    shapes = {}
    for path in glob.glob(os.path.join(checkpoint_dir, "*_model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        for group in state.get("param_shapes") or []:
            shapes.update(group)
    return shapes


def convert_to_universal(checkpoint_dir: str, output_dir: str) -> None:
    """Write the universal checkpoint of ``checkpoint_dir`` (one tag folder) to ``output_dir``."""
    files = _optim_files(checkpoint_dir)
    if [dp for dp, _ in files] != list(range(len(files))):
        raise ValueError(f"{checkpoint_dir}: data-parallel ranks {[dp for dp, _ in files]} are not 0..{len(files) - 1}")
    shapes = _param_shapes(checkpoint_dir)
    fragments: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    steps: dict[str, torch.Tensor] = {}
    first = None
    for dp, path in files:
        optim = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        if optim.get("zero_stage", 1) not in (1, 2) and int(optim.get("zero_stage")) not in (1, 2):
            raise ValueError(f"{path}: ZeRO stage {optim.get('zero_stage')} is not supported")
        base = optim["base_optimizer_state"]
        if not isinstance(base, dict) or "muon_megatron" not in base:
            raise ValueError(
                f"{path} was not written by muon_megatron's DeepSpeed Muon; convert it with DeepSpeed's "
                "ds_to_universal instead"
            )
        first = first or optim
        state = base["state"]
        for group_index, mapping in enumerate(optim["param_slice_mappings"]):
            flat_state = {"fp32": optim["single_partition_of_fp32_groups"][group_index]}
            group_state = state.get(group_index, state.get(str(group_index), {}))
            for key, value in group_state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    flat_state[key] = value.view(-1)
            for name, fragment in mapping.items():
                start, numel = int(fragment.start), int(fragment.numel)
                for key, flat in flat_state.items():
                    fragments[name][key].append(flat.narrow(0, start, numel).clone())
                if "step" in group_state:
                    steps[name] = group_state["step"]
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
    sharded = {"base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups"}
    common = {k: v for k, v in first.items() if k not in sharded}
    common["param_groups"] = first["base_optimizer_state"]["param_groups"]
    torch.save(common, os.path.join(zero_dir, "optimizer_state.pt"))
    for path in glob.glob(os.path.join(checkpoint_dir, "*_model_states.pt")):
        shutil.copy(path, os.path.join(output_dir, os.path.basename(path)))
    logger.info("muon_megatron: universal checkpoint of %d parameters from %d DP ranks written to %s",
                len(fragments), len(files), output_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert a muon_megatron DeepSpeed ZeRO-1/2 checkpoint to universal")
    parser.add_argument("input", help="the checkpoint's tag folder (holding *_optim_states.pt)")
    parser.add_argument("output", help="the universal tag folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    convert_to_universal(args.input, args.output)


if __name__ == "__main__":
    main()
