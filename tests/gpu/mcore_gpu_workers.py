"""Workers of the NCCL parity runner for megatron-core (tests only; run in spawned ranks).

``reference64_worker`` (world 1, CPU): the single-process reference of :mod:`mcore_parity` in
float64. It builds the same fp32 model from the same seed, keeps those fp32 weights as the initial
weights every parallel run loads, then casts the model to float64 and trains it with
``muon_megatron.Muon`` (Newton-Schulz in float64, splits as ``mcore_parity.reference_splits``) on
the whole global batch; the loss is the mean next-token cross entropy computed here in float64
(megatron-core's own fused loss casts logits to float32).

``sequence_parallel_worker``: ``mcore_parity.parallel_worker`` with Megatron's sequence parallelism
on (TP > 1). megatron-core's torch norms (the local layer spec without Apex or Transformer Engine)
refuse sequence parallelism; for this worker they are replaced by torch's ``RMSNorm`` with its
weight marked ``sequence_parallel``, the contract Megatron's fused norms follow so that
``finalize_model_grads`` all-reduces their gradients over the TP group. The function computed is
the reference's (same RMSNorm, same eps, same parameter names).
"""

from __future__ import annotations

import contextlib
import functools

import torch

import mcore_models as mm
import mcore_parity as mp


def _loss64(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in the model's dtype (``mcore_models.loss_of`` without the
    float32 cast of megatron-core's fused loss)."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    logits = model(inputs, position_ids, None)  # [batch, seq, vocab] without labels
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def reference64(spec: mm.TinySpec, steps: int, path: str) -> list[float]:
    """Train the float64 reference ``steps`` steps; save ``{"initial", "final", "losses"}`` to ``path``
    (initial weights fp32, final float64)."""
    from muon_megatron import Muon
    from muon_megatron.core.routing import muon_param_groups

    mp._init_parallel()
    model = mm.build_gpt(spec)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.double()
    groups = muon_param_groups(model, splits=mp.reference_splits(spec, model))
    opt = Muon(groups, lr=mp.LR, weight_decay=mp.WD, adamw_betas=mp.BETAS, adamw_eps=mp.EPS, ns_dtype="float64")
    losses = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        loss = _loss64(model, mm.batch(step, spec))
        if loss.dtype != torch.float64:
            raise AssertionError(f"the float64 reference computed its loss in {loss.dtype}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], mp.CLIP)
        opt.step()
        losses.append(loss.item())
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"initial": initial, "final": final, "losses": losses}, path)
    return losses


def reference64_worker(rank, world, jobs):
    """Several float64 references in one process: ``jobs`` is a list of (spec, steps, path)."""
    from megatron.core import parallel_state as ps

    out = []
    for spec, steps, path in jobs:
        out.append(reference64(spec, steps, path))
        ps.destroy_model_parallel()
    return out


def reference_bf16_worker(rank, world, jobs):
    """Single-process references with Newton-Schulz in bf16 (``mcore_parity.reference_worker``, fp32
    model): the scale of bf16 rounding that the NCCL runner's bf16 bound is built on."""
    from megatron.core import parallel_state as ps

    out = []
    for spec, steps, path in jobs:
        out.append(mp.reference_worker(rank, world, spec, steps, path, ns_dtype="bfloat16"))
        ps.destroy_model_parallel()
    return out


def _sequence_parallel_rms_norm(cls, config, hidden_size, eps=1e-5, **kwargs):
    """Stands in for ``WrappedTorchNorm.__new__``: torch's RMSNorm, weight marked sequence-parallel."""
    if config.normalization != "RMSNorm":
        raise ValueError(f"the sequence-parallel test norm implements RMSNorm only, not {config.normalization}")
    norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
    norm.weight.sequence_parallel = config.sequence_parallel
    return norm


@contextlib.contextmanager
def sequence_parallel_on():
    """Within the block, ``mcore_models.build_gpt`` builds with ``sequence_parallel=True`` when TP > 1,
    and megatron-core's torch norms are the sequence-parallel RMSNorm above."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    transformer_config, new = mm.transformer_config, WrappedTorchNorm.__dict__["__new__"]

    @functools.wraps(transformer_config)
    def with_sequence_parallel(spec, **parallel):
        parallel["sequence_parallel"] = parallel.get("tensor_model_parallel_size", 1) > 1
        return transformer_config(spec, **parallel)

    mm.transformer_config = with_sequence_parallel
    WrappedTorchNorm.__new__ = staticmethod(_sequence_parallel_rms_norm)
    try:
        yield
    finally:
        mm.transformer_config = transformer_config
        WrappedTorchNorm.__new__ = new


def sequence_parallel_worker(rank, world, *args, **kwargs):
    """``mcore_parity.parallel_worker`` under :func:`sequence_parallel_on`; also reports whether the
    model really ran sequence-parallel (``config.sequence_parallel`` and the marked norm weights)."""
    build = mm.build_gpt
    seen = {}

    def build_and_record(*a, **k):
        model = build(*a, **k)
        seen["sequence_parallel"] = bool(model.config.sequence_parallel)
        seen["marked_norms"] = sum(bool(getattr(p, "sequence_parallel", False)) for p in model.parameters())
        return model

    mm.build_gpt = build_and_record
    try:
        with sequence_parallel_on():
            errors, losses, plan = mp.parallel_worker(rank, world, *args, **kwargs)
    finally:
        mm.build_gpt = build
    return errors, losses, dict(plan, **seen)


def run_cases_logged(rank, world, cases):
    """``mcore_suite.run_cases``, one case at a time, printing each outcome (and its largest error
    against the reference's final weights; large for a case that stops early to save) as it ends: a
    world that hangs or dies later still leaves them in the log."""
    import sys

    import mcore_suite

    results = {}
    for case in cases:
        name = case[0]
        results.update(mcore_suite.run_cases(rank, world, [case]))
        status, value = results[name]
        if status == "ok":
            errors = value[0]
            worst = max(errors, key=errors.get)
            line = f"[megatron rank {rank}/{world}] {name}: ok, largest error {errors[worst]:.3e} ({worst})"
        else:
            line = f"[megatron rank {rank}/{world}] {name}: FAILED\n{value}"
        sys.stdout.write(line + "\n")  # one write: the ranks share the stream
        sys.stdout.flush()
    return results
