"""Checkpoints of the Muon optimizer in Megatron's formats.

Optimizer state is heterogeneous: Muon tensors hold ``momentum_buffer`` only (half of AdamW's
state), AdamW tensors ``step`` / ``exp_avg`` / ``exp_avg_sq``. megatron-core's distributed
optimizer checkpoint code assumes every tensor carries Adam's keys, except in its
model-space formats, one of which (flattened ranges) megatron-core 0.19 no longer accepts.
:class:`MuonDistributedOptimizer` therefore writes its own model-space format for ``torch_dist``:
each state tensor of each parameter, assembled whole (tensor-parallel-local) over the DP ranks and
described by the model parameter's own ``ShardedTensor``, so it reshards across DP and TP sizes
like the model weights do. Its non-tensor state (param-group hyper-parameters, the step
count, the loss scaler) is the same on every rank and is saved as common state.

Without the distributed optimizer, megatron-core's ``Float16OptimizerWithFloat16Params`` /
``FP32Optimizer`` map any state key onto the model's sharded tensors already; the inner optimizer
(:class:`.inner.MegatronMuon`) keeps its structural group keys (``layouts``, ``names``,
``use_muon``) out of checkpoints and across loads, so a checkpoint from another layout loads; the
wrappers of :func:`muon_wrapper_class` match param groups by their ``use_muon`` markers.

Legacy ``--ckpt-format torch`` with the distributed optimizer: one file on DP rank 0 with every rank's
fp32 main-parameter shards, Muon momentum and AdamW shard state; it loads at the same DP size.
Another optimizer's state (e.g. AdamW's) loaded into Muon raises
:class:`.state.OptimizerStateMismatch` naming ``--no-load-optim``. (The reverse, Muon state loaded
by megatron-core's Adam, fails inside megatron-core with its own message.)

The classes here only adapt megatron-core's wrappers; what is saved and how it is checked and
restored are the pure functions of :mod:`.state`.
"""

from __future__ import annotations

import logging

import torch

from .state import (
    STEPS_KEY,
    check_muon_groups,
    group_settings,
    init_muon_state,
    load_group_settings,
    pack_rank_state,
    set_adamw_steps,
    state_keys,
    state_mismatch_error,
    state_tensor,
    unpack_rank_state,
)

logger = logging.getLogger(__name__)

SHARDING_TYPE = "muon_megatron_model_space"


def _distributed_optimizer_class():
    from megatron.core.optimizer import DistributedOptimizer

    class MuonDistributedOptimizer(DistributedOptimizer):
        """megatron-core's ``DistributedOptimizer`` around :class:`MegatronMuon`, with checkpoints
        for heterogeneous (Muon + AdamW) state. See the module docstring."""

        muon_steps = 0
        muon_routes: dict = {}  # model param -> True (Muon) / False (AdamW); set by the factory

        def prepare_grads(self) -> bool:
            found_inf = super().prepare_grads()
            end_of_forward_passes(self)
            return found_inf

        def step_with_ready_grads(self) -> bool:
            taken = super().step_with_ready_grads()
            if taken and not self.is_stub_optimizer:
                self.muon_steps += 1
            return taken

        def state_dict(self):
            sd = {"optimizer": {"param_groups": group_settings(self.optimizer.param_groups), STEPS_KEY: self.muon_steps}}
            if self.grad_scaler:
                sd["grad_scaler"] = self.grad_scaler.state_dict()
            return sd

        def load_state_dict(self, state_dict):
            optimizer = state_dict.get("optimizer", {})
            if STEPS_KEY not in optimizer:
                raise state_mismatch_error(f"no {STEPS_KEY} entry; it was written by another optimizer")
            load_group_settings(self.optimizer.param_groups, optimizer["param_groups"])
            self.muon_steps = int(optimizer[STEPS_KEY])
            init_muon_state(self.optimizer)
            set_adamw_steps(self.optimizer, self.muon_steps)
            if self.grad_scaler and "grad_scaler" in state_dict:
                self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
            if "param_state" in state_dict:
                kind = state_dict.get("param_state_sharding_type")
                if kind != SHARDING_TYPE:
                    raise state_mismatch_error(f"parameter state of type {kind!r}")
                self._load_model_space_state(state_dict["param_state"])

        def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, sharding_type=None,
                               metadata=None):
            requested = sharding_type or (metadata or {}).get("distrib_optim_sharding_type")
            if requested not in (None, SHARDING_TYPE) and not getattr(self, "_noted_format", False):
                self._noted_format = True
                logger.info(
                    "muon-megatron: distributed optimizer state is saved in model space (reshardable over DP "
                    "and TP), not as %s", requested,
                )
            if is_loading:
                init_muon_state(self.optimizer)
            sd = self.state_dict()
            sd["param_state"] = self._model_space_state(model_sharded_state_dict or {}, is_loading)
            sd["param_state_sharding_type"] = SHARDING_TYPE
            return sd

        # Model-space state: for each model parameter (in buffer order, the same on every DP rank)
        # and each state key, the full (tensor-parallel-local) tensor, assembled from the DP ranks'
        # ranges by one all-reduce, and described by the model parameter's own ShardedTensor. DP
        # rank 0 writes it (the model's replica ids); loading slices each rank's range back out.

        def _model_params(self):
            for buffer in self.buffers:
                yield from buffer.param_index_map

        def _local(self, model_param):
            """(main tensor, its state, (start, stop)) or None when this DP rank owns no range."""
            if model_param not in self.model_param_group_index_map:
                return None
            group_index, order = self.model_param_group_index_map[model_param]
            main = self.optimizer.param_groups[group_index]["params"][order]
            rng = self._get_model_param_range_map(model_param)["param"]
            return main, self.optimizer.state[main], (rng.start, rng.end)

        def _model_space_state(self, model_sharded_state_dict, is_loading):
            from dataclasses import replace

            from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
            from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
            from megatron.core.dist_checkpointing.dict_utils import nested_values

            tensors_and_factories, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
            metadata = {sh.data: sh for sh in nested_values(tensors_and_factories)}
            state = {}
            for index, model_param in enumerate(self._model_params()):
                if model_param not in metadata:
                    raise ValueError(
                        "muon-megatron: a parameter is missing from the model's sharded state dict; build it "
                        "with the model's sharded_state_dict() (which keeps the parameters themselves)"
                    )
                meta = metadata[model_param]
                local = self._local(model_param)
                entry = {}
                for key in state_keys(self.muon_routes[model_param]):
                    full = torch.zeros(model_param.numel(), dtype=torch.float32, device=model_param.device)
                    if not is_loading:
                        if local is not None:
                            main, st, (start, stop) = local
                            full[start:stop] = state_tensor(main, st, key).detach().view(-1)
                        torch.distributed.all_reduce(full, group=self.data_parallel_group)
                    kwargs = dict(key=f"optimizer.state.{key}.{meta.key}", data=full.view(model_param.shape))
                    if not isinstance(meta, ShardedTensorFactory):
                        kwargs["dtype"] = torch.float32
                    entry[key] = replace(meta, **kwargs)
                state[index] = entry
            return state

        def _load_model_space_state(self, state):
            for index, model_param in enumerate(self._model_params()):
                local = self._local(model_param)
                if local is None:
                    continue
                main, st, (start, stop) = local
                saved = state[index]
                for key in state_keys(self.muon_routes[model_param]):
                    if key not in saved:
                        raise state_mismatch_error(f"no {key!r} for a parameter")
                    state_tensor(main, st, key).data.view(-1).copy_(saved[key].reshape(-1)[start:stop])

        def save_parameter_state(self, filename: str):
            """``--ckpt-format torch``: every data-parallel rank's fp32 main-parameter shards, Muon
            momentum (as layout pieces) and AdamW shard state, gathered into one file on DP rank 0."""
            mine = pack_rank_state(self.optimizer)
            gathered = [None] * self.data_parallel_group.size()
            torch.distributed.all_gather_object(gathered, mine, group=self.data_parallel_group)
            if self.data_parallel_group.rank() == 0:
                torch.save({"sharding_type": SHARDING_TYPE, "ranks": gathered}, filename)

        def load_parameter_state(self, filename: str, *, update_legacy_format=False):
            """Inverse of :meth:`save_parameter_state`, at the same data-parallel size (else a
            ValueError saying to use torch_dist, which reshards)."""
            saved = torch.load(filename, map_location="cpu", weights_only=False)
            if not isinstance(saved, dict) or saved.get("sharding_type") != SHARDING_TYPE:
                raise state_mismatch_error(f"{filename} is not muon-megatron's distributed-optimizer state")
            ranks = saved["ranks"]
            if len(ranks) != self.data_parallel_group.size():
                raise ValueError(
                    f"{filename} holds the shards of {len(ranks)} data-parallel ranks, this run has "
                    f"{self.data_parallel_group.size()}; resume at the same DP size, or use --ckpt-format torch_dist "
                    "(which reshards)"
                )
            unpack_rank_state(self.optimizer, ranks, self.data_parallel_group.rank())

    return MuonDistributedOptimizer


def end_of_forward_passes(wrapper) -> None:
    """QK-Clip: the step's forward passes are over (megatron-core prepares the gradients of every
    step, taken or skipped, exactly once): its max logits leave the recorder, so a skipped step's
    never reach the next one. Nothing without QK-Clip."""
    clip = getattr(wrapper.optimizer, "qk_clip", None)
    if clip is not None:
        clip.take()


def _check_inner_groups(inner_state: dict) -> None:
    groups = inner_state.get("param_groups", [])
    if not groups or any("use_muon" not in g for g in groups):
        raise state_mismatch_error("param groups without muon-megatron's use_muon markers")


_WRAPPERS: dict = {}


def muon_wrapper_class(base):
    """A subclass of megatron-core's ``Float16OptimizerWithFloat16Params`` or ``FP32Optimizer``
    whose ``load_state_dict`` first checks that the state is Muon's (else
    :class:`.state.OptimizerStateMismatch` naming ``--no-load-optim``), and whose
    ``prepare_grads`` ends the step's QK-Clip measurements (:func:`end_of_forward_passes`)."""
    if base not in _WRAPPERS:

        def load_state_dict(self, state_dict):
            inner = state_dict.get("optimizer", state_dict) if isinstance(state_dict, dict) else {}
            _check_inner_groups(inner if "param_groups" in inner else state_dict)
            return base.load_state_dict(self, state_dict)

        def prepare_grads(self):
            found_inf = base.prepare_grads(self)
            end_of_forward_passes(self)
            return found_inf

        def match_groups(current_groups, state_dict_groups):
            # megatron-core matches saved and current groups by (wd_mult, lr_mult, ...) tuples, which
            # are equal for our Muon and AdamW groups on 0.16; ours come in a fixed order and carry
            # use_muon, so match by position and check the markers instead.
            check_muon_groups(state_dict_groups, current_groups)
            return list(state_dict_groups)

        _WRAPPERS[base] = type(
            f"Muon{base.__name__}",
            (base,),
            {"load_state_dict": load_state_dict, "prepare_grads": prepare_grads,
             "_filter_and_reorder_param_groups": staticmethod(match_groups)},
        )
    return _WRAPPERS[base]


_CLASS = None


def muon_distributed_optimizer_class():
    """The ``DistributedOptimizer`` subclass (built on first use, so importing this module does
    not import megatron-core)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _distributed_optimizer_class()
    return _CLASS
