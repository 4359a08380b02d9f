"""``Muon``: Moonlight's optimizer for one process, as a ``torch.optim.Optimizer``.

Param groups carry ``use_muon``: True groups get the Muon update of :mod:`.update` on every
logical matrix of their ``split`` (default: :func:`.splits.default_split`), False groups get
AdamW with the group's lr and weight decay (bitwise what ``torch.optim.AdamW`` computes on the
CPU). :func:`.routing.muon_param_groups` builds the groups the Moonlight way. Everything but
where the matrices are (here: whole parameters of this process) is :class:`.base.MuonBase`'s.

This is the reference every distributed path is tested against.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import MuonBase
from .splits import LogicalMatrix, SplitSpec, check_tiling, default_split, gather_matrix
from .update import apply_orthogonal_, decay_, group_by_shape, momentum_, orthogonalize_batched, update_scale


class Muon(MuonBase):
    """Moonlight's Muon with AdamW for the non-matrix parameters, in one process.

    Arguments are :class:`.base.MuonBase`'s; Muon groups may also carry ``split`` (a
    :class:`SplitSpec`; default :func:`.splits.default_split` of each parameter's shape).

    Promise: for each logical matrix, the update of ``../shared/MOONLIGHT.md`` (paper eq. 4); equal
    to a float64 evaluation of the formula within ``ns_dtype`` rounding.
    """

    def _check_group(self, group: dict, index: int) -> None:
        split = group.get("split")
        if not group["use_muon"]:
            if split is not None:
                raise ValueError("a use_muon=False (AdamW) group cannot carry a 'split'")
            return
        if split is not None and not isinstance(split, SplitSpec):
            raise ValueError(f"param group 'split' must be a SplitSpec, got {split!r}")
        for name, p in zip(group["names"], group["params"]):
            self._matrices(group, p, name)  # validates now, not at the first step

    @staticmethod
    def _matrices(group: dict, p: torch.Tensor, name: Optional[str]) -> tuple[LogicalMatrix, ...]:
        label = repr(name) if name else f"a parameter of shape {tuple(p.shape)}"
        try:
            split = group.get("split") or default_split(p.shape)
            view = split.view_shape(p.shape)
            matrices = split.matrices(p.shape)
            check_tiling(matrices, view, label)
        except ValueError as err:
            raise ValueError(
                f"Muon cannot orthogonalise {label} (shape {tuple(p.shape)}): {err}. Route it to AdamW "
                "(a param group with use_muon=False, or the adamw=[...] name patterns of "
                "muon_param_groups) or give it a split spec whose logical matrices are 2-D."
            ) from None
        return matrices

    def _muon_step(self, groups: list[tuple[int, dict]], sums: dict[int, list]) -> None:
        for index, group in groups:
            self._muon_group(index, group, sums)

    def _muon_group(self, index: int, group: dict, sums: dict[int, list]) -> None:
        # Newton-Schulz inputs for every parameter, then Newton-Schulz one bucket (same shape, at
        # most ``max_batch`` matrices) at a time, so the transient memory is one bucket, not the model.
        lr = group["lr"]
        members = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
        for _, p in members:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        inputs = momentum_([self.state[p]["momentum_buffer"] for _, p in members], [p.grad for _, p in members],
                           momentum=group["momentum"], nesterov=group["nesterov"])
        views, places = {}, []
        for (i, p), U in zip(members, inputs):
            views[id(p)] = U.reshape((group.get("split") or default_split(p.shape)).view_shape(p.shape))
            places.extend((p, mat) for mat in self._matrices(group, p, group["names"][i]))
        decay_([p for _, p in members], lr=lr, weight_decay=group["weight_decay"])
        orthogonalize = self.orthogonalize or orthogonalize_batched
        for shape, indices in group_by_shape(mat.shape for _, mat in places).items():
            step = lr * update_scale(group["update_scale"], *shape)
            for start in range(0, len(indices), self.max_batch):
                chunk = [places[k] for k in indices[start : start + self.max_batch]]
                outputs = orthogonalize(
                    [gather_matrix(views[id(p)], mat) for p, mat in chunk],
                    steps=group["ns_steps"], coefficients=group["ns_coefficients"], dtype=group["ns_dtype"],
                )
                # W -= lr * scale * O, block by block straight from the output (DistributedMuon
                # applies the same regions the same way, so both agree bit for bit)
                targets, updates = [], []
                for (p, mat), O in zip(chunk, outputs):
                    view = p.view(views[id(p)].shape)
                    for b in mat.blocks:
                        targets.append(view[b.src_row : b.src_row + b.rows, b.src_col : b.src_col + b.cols])
                        updates.append(O[b.dst_row : b.dst_row + b.rows, b.dst_col : b.dst_col + b.cols])
                    self._report(sums, index, O, step)
                apply_orthogonal_(targets, updates, [step] * len(targets))
