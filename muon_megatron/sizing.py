"""``muon-megatron plan``: what Muon costs a Moonlight-family model under a Megatron parallel layout.

Simulates, without processes, where megatron-core puts every parameter (tensor, pipeline, expert
and data parallelism; the distributed optimizer's gradient buffers) and hands the resulting
holdings to the distributed engine's real planner (:func:`muon_megatron.distributed.make_plan`),
then reports per rank: parameters held, optimizer-state bytes (Muon vs AdamW), Newton-Schulz
TFLOP per step, bytes sent per optimizer step, and NS seconds at a given TFLOP/s.

How the layout is simulated (megatron-core's conventions):

- Ranks are numbered tensor-parallel fastest, then data-parallel, then pipeline stage. Stages own
  contiguous layers (as even as possible, earlier stages taking the remainder, or the split given
  by ``--first-stage-layers``); the embedding sits on the first stage, the output layer on the last.
- Dense weights are cut by TP (``Weight.tp_dim``) and their local shards placed in the dense
  gradient buffer of each TP rank, sharded over the ``dp`` ranks of its data-parallel group.
- Routed experts are spread over ``ep`` expert-parallel ranks (``etp`` expert-TP inside them) and
  placed in the expert buffer, sharded over the expert-data-parallel group of
  ``tp * dp / (ep * etp)`` ranks (expert ranks: etp fastest, then ep, then expert-DP).
- ``--layout bucketed`` (megatron-core's default, ``bucketed_layouts``), ``flat`` (one flat
  buffer, DeepSpeed ZeRO-1 style) or ``aligned`` (every matrix whole in one DP partition).

Accounting (stated so the figures can be checked):

- *optimizer state*: the optimizer's own fp32 tensors on the rank's DP shard: Muon's momentum
  (4 B/element) for Muon parameters plus AdamW's two moments (8 B/element) for the rest, against
  8 B/element everywhere for distributed AdamW. Master weights (4 B/element in both) and the
  gradient buffer are not included.
- *communication*: bytes the rank sends in one optimizer step: the engine's gradient
  reduce-scatter (``--grad-bytes``, default 4: megatron-core's fp32 gradient buffer) and parameter
  all-gather (``--param-bytes``, default 2: bf16), ring algorithm (``(g - 1) / g`` of the buffer),
  plus Muon's own exchange from the plan (pieces to owners and results back, in the NS dtype,
  ``--ns-bytes``, default 2). AdamW's figure is the engine part alone. Forward/backward traffic
  (TP, EP, PP) is the same for both optimizers and left out.
- *NS TFLOP*: ``ns_flops`` (dense FLOPs of 5 steps) summed per owner, every matrix counted once.

The JSON keys ``optimizer_state_bytes_per_rank``, ``adamw_optimizer_state_bytes_per_rank``,
``comm_bytes_per_rank`` and ``params_per_rank`` hold the maximum over ranks (what must fit the
busiest rank); ``per_rank`` holds the full lists.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace, asdict, dataclass, field
from typing import Optional, Sequence

from .distributed.layout import (
    AlignItem, ParamLayout, ParamSpec, aligned_layout, bucketed_layouts, flat_layouts, holdings, tensor_parallel_shard,
)
from .distributed.plan import make_plan, ns_flops
from .core.splits import ExpertStack, GateUp, SplitSpec, Whole
from .models.spec import ModelSpec, Weight, count_params, weights

LAYOUTS = ("bucketed", "flat", "aligned")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """A Megatron parallel layout."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    ep: int = 1
    """Expert-parallel size."""
    dp: int = 1
    """Data-parallel size (world size = tp * pp * dp)."""
    etp: int = 1
    """Expert tensor-parallel size (megatron-core's --expert-tensor-parallel-size)."""
    layout: str = "bucketed"
    """Gradient-buffer layout: "bucketed" (megatron-core), "flat" (ZeRO-1) or "aligned"."""
    bucket_numel: Optional[int] = None
    """Bucket size in elements for "bucketed" (default: megatron-core's max(4e7, 1e6 * dp))."""
    first_stage_layers: Optional[int] = None
    """Layers on the first pipeline stage (megatron's --decoder-first-pipeline-num-layers); the
    rest are spread evenly."""

    def __post_init__(self):
        for f in ("tp", "pp", "ep", "dp", "etp"):
            if getattr(self, f) < 1:
                raise ValueError(f"--{f} must be >= 1, got {getattr(self, f)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if (self.tp * self.dp) % (self.ep * self.etp):
            raise ValueError(
                f"tp * dp = {self.tp * self.dp} is not divisible by ep * etp = {self.ep * self.etp}: megatron-core "
                "needs the expert-parallel group to fit the ranks of a pipeline stage"
            )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size."""
        return self.tp * self.dp // (self.ep * self.etp)

    def validate_for(self, spec: ModelSpec) -> None:
        """ValueError naming the flag if the layout does not fit ``spec``."""
        if self.pp > spec.num_layers:
            raise ValueError(f"--pp {self.pp} exceeds the model's {spec.num_layers} layers")
        if self.first_stage_layers is not None and not 1 <= self.first_stage_layers <= spec.num_layers - (self.pp - 1):
            raise ValueError(f"--first-stage-layers {self.first_stage_layers} leaves a pipeline stage without layers")
        a = spec.attention
        if a.num_heads % self.tp:
            raise ValueError(f"--tp {self.tp} does not divide the {a.num_heads} attention heads")
        for what, size in (("dense FFN", spec.dense_ffn), ("vocabulary", spec.vocab_size)):
            if size % self.tp:
                raise ValueError(f"--tp {self.tp} does not divide the {what} ({size})")
        if spec.moe is not None:
            m = spec.moe
            if m.num_experts % self.ep:
                raise ValueError(f"--ep {self.ep} does not divide the {m.num_experts} routed experts")
            if m.expert_ffn % self.etp:
                raise ValueError(f"--etp {self.etp} does not divide the expert FFN width {m.expert_ffn}")
            if m.shared_ffn % self.tp:
                raise ValueError(f"--tp {self.tp} does not divide the shared-expert width {m.shared_ffn}")


def stage_layers(num_layers: int, pp: int, first: Optional[int] = None) -> list[range]:
    """The layers of each pipeline stage: contiguous, as even as possible (earlier stages take the
    remainder), or ``first`` layers on stage 0 and the rest spread evenly."""
    if first is None:
        base, extra = divmod(num_layers, pp)
        sizes = [base + (s < extra) for s in range(pp)]
    else:
        rest = [0] if pp == 1 else stage_layers(num_layers - first, pp - 1)
        sizes = [first] + ([len(r) for r in rest] if pp > 1 else [])
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


@dataclass(frozen=True)
class _Local:
    """One parameter as one rank's local tensor: its buffer key, full 2-D view, split, TP shard."""

    key: str
    full_shape: tuple[int, int]
    split: SplitSpec
    shard: tuple[int, int, int, int]
    use_muon: bool

    @property
    def numel(self) -> int:
        return self.shard[2] * self.shard[3]


def _shard(rows: int, cols: int, dim: Optional[int], size: int, index: int) -> tuple[int, int, int, int]:
    return tensor_parallel_shard((rows, cols), dim, size, index) or (0, 0, rows, cols)


def _dense_local(w: Weight, tp: int, t: int) -> _Local:
    if len(w.shape) == 1:  # norms: replicated, AdamW
        return _Local(w.name, (1, w.shape[0]), Whole(), (0, 0, 1, w.shape[0]), False)
    rows, cols = w.shape
    split = GateUp(num_shards=tp) if isinstance(w.split, GateUp) else (w.split or Whole())
    return _Local(w.name, (rows, cols), split, _shard(rows, cols, w.tp_dim, tp, t), w.use_muon)


def _expert_locals(w: Weight, experts: range, etp: int, e: int) -> list[_Local]:
    """The experts of one stacked weight that expert-parallel rank holds, each its own parameter
    (named by its global expert index), cut by expert-TP."""
    _, rows, cols = w.shape
    inner = w.split.inner if isinstance(w.split, ExpertStack) else None
    split = GateUp(num_shards=etp) if isinstance(inner, GateUp) else Whole()
    out = []
    for g in experts:
        key = w.name.replace("mlp.experts.", f"mlp.experts.expert{g}.") + ".weight"
        out.append(_Local(key, (rows, cols), split, _shard(rows, cols, w.tp_dim, etp, e), w.use_muon))
    return out


def _buffer_layouts(
    locals_: Sequence[_Local], group: int, par: ParallelConfig
) -> tuple[list[list[tuple[ParamLayout, bool]]], int]:
    """Shard one gradient buffer (the same local tensors on every rank of the group) over the
    ``group`` ranks. Returns, per group rank, ``(layout, uses_muon)`` for every parameter it holds
    a piece of (AdamW ones included), and the buffer's size in elements with padding."""
    if par.layout == "aligned":
        # Muon tensors in a buffer of their own ordered by aligned_layout (each matrix whole on one
        # rank but for oversized ones); AdamW tensors flatly sharded in another, as Megatron keeps
        # separate buckets and DeepSpeed separate param groups.
        muon = [loc for loc in locals_ if loc.use_muon]
        adamw = [loc for loc in locals_ if not loc.use_muon]
        items = [
            AlignItem.of(loc.key, loc.full_shape, loc.split) if loc.shard[2:] == loc.split.view_shape(loc.full_shape)
            else AlignItem(loc.key, loc.numel, ns_flops(*loc.shard[2:]))
            for loc in muon
        ]
        aligned = aligned_layout(items, group)
        size = aligned.partition_size
        per_rank: list[list[tuple[ParamLayout, bool]]] = [[] for _ in range(group)]
        for loc in muon:
            lo = aligned.offsets[loc.key]
            for r in range(lo // size, min(group, -(-(lo + loc.numel) // size))):
                a, b = max(lo, r * size) - lo, min(lo + loc.numel, (r + 1) * size) - lo
                if b > a:
                    flat = None if (a, b) == (0, loc.numel) else (a, b)
                    per_rank[r].append((ParamLayout(loc.key, loc.full_shape, loc.split, loc.shard, flat), True))
        rest, rest_size = _buffer_layouts(adamw, group, replace(par, layout="flat")) if adamw else ([[]] * group, 0)
        return [mine + other for mine, other in zip(per_rank, rest)], size * group + rest_size
    # The simulators need only sizes and order: a (1, numel) stand-in of each local tensor, all
    # marked Muon so every piece comes back; the real split, shard and route are put back below.
    specs = [ParamSpec(loc.key, (1, loc.numel), Whole(), True) for loc in locals_]
    by_key = {loc.key: loc for loc in locals_}
    raw = bucketed_layouts(specs, group, par.bucket_numel) if par.layout == "bucketed" else flat_layouts(specs, group)
    per_rank = []
    for layouts in raw:
        out = []
        for pl in layouts:
            loc = by_key[pl.key]
            out.append((ParamLayout(loc.key, loc.full_shape, loc.split, loc.shard, pl.flat_range), loc.use_muon))
        per_rank.append(out)
    return per_rank, -(-sum(loc.numel for loc in locals_) // group) * group


@dataclass
class SizingReport:
    """The planner's figures for one model and layout (see the module docstring for units)."""

    model: str
    layout: dict
    world_size: int
    total_params: int
    active_params: int
    ns_tflop_per_step: float
    max_rank_ns_tflop: float
    mean_rank_ns_tflop: float
    ns_imbalance: float
    ns_seconds_at_tflops: float
    tflops: float
    params_per_rank: int
    optimizer_state_bytes_per_rank: int
    adamw_optimizer_state_bytes_per_rank: int
    comm_bytes_per_rank: int
    adamw_comm_bytes_per_rank: int
    muon_exchange_bytes_per_rank: int
    matrices: int
    per_rank: dict = field(default_factory=dict)

    def to_json(self, per_rank: bool = True) -> dict:
        out = asdict(self)
        if not per_rank:
            out.pop("per_rank")
        return out


def size_model(spec: ModelSpec, par: ParallelConfig, *, ns_steps: int = 5, tflops: float = 400.0,
               grad_bytes: int = 4, param_bytes: int = 2, ns_bytes: int = 2) -> SizingReport:
    """Simulate ``spec`` under ``par`` and plan Muon with the distributed engine's planner."""
    par.validate_for(spec)
    T, D, E, ETP = par.tp, par.dp, par.ep, par.etp
    stage_size = T * D
    world = par.world_size
    all_weights = weights(spec)
    stages = stage_layers(spec.num_layers, par.pp, par.first_stage_layers)
    n = world
    params = [0] * n
    muon_state = [0] * n
    adamw_state = [0] * n
    engine_comm = [0.0] * n
    exchange = [0] * n
    flops = [0.0] * n
    matrices = 0
    experts_per_rank = spec.moe.num_experts // E if spec.moe else 0

    for s, layers in enumerate(stages):
        def on_stage(w: Weight) -> bool:
            if w.layer is not None:
                return w.layer in layers
            if w.kind == "embedding":
                return s == 0
            return s == len(stages) - 1  # final norm and output layer

        stage_weights = [w for w in all_weights if on_stage(w)]
        dense = [w for w in stage_weights if not w.expert]
        expert = [w for w in stage_weights if w.expert]
        base = s * stage_size
        stage_holdings = []
        # Dense buffer: one per TP rank, sharded over its DP group (ranks t, t + T, ...).
        for t in range(T):
            locals_ = [_dense_local(w, T, t) for w in dense]
            per_dp, padded = _buffer_layouts(locals_, D, par)
            local_numel = sum(loc.numel for loc in locals_)
            for d in range(D):
                r = d * T + t
                params[base + r] += local_numel
                engine_comm[base + r] += padded * (D - 1) / D * (grad_bytes + param_bytes)
                for slot, (pl, muon) in enumerate(per_dp[d]):
                    _account(pl.numel, muon, muon_state, adamw_state, base + r)
                    if muon:
                        stage_holdings += holdings(pl, r, slot)
        # Expert buffer: per (expert-TP, EP) rank, sharded over the expert-DP group.
        if expert:
            edp = par.edp
            for e_idx in range(E):
                experts = range(e_idx * experts_per_rank, (e_idx + 1) * experts_per_rank)
                for k in range(ETP):
                    locals_ = [loc for w in expert for loc in _expert_locals(w, experts, ETP, k)]
                    per_edp, padded = _buffer_layouts(locals_, edp, par)
                    local_numel = sum(loc.numel for loc in locals_)
                    for j in range(edp):
                        r = j * (E * ETP) + e_idx * ETP + k
                        params[base + r] += local_numel
                        engine_comm[base + r] += padded * (edp - 1) / edp * (grad_bytes + param_bytes)
                        for slot, (pl, muon) in enumerate(per_edp[j]):
                            _account(pl.numel, muon, muon_state, adamw_state, base + r)
                            if muon:  # slots are unique per rank: expert slots after dense ones
                                stage_holdings += holdings(pl, r, _EXPERT_SLOT + slot)
        plan = make_plan(stage_holdings, stage_size, ns_steps=ns_steps)
        matrices += len(plan.matrices)
        for r, (f, b) in enumerate(zip(plan.flops, plan.send_bytes(ns_bytes))):
            flops[base + r] += f
            exchange[base + r] += b

    counts = count_params(spec)
    total_flops = sum(flops)
    comm = [round(c) + x for c, x in zip(engine_comm, exchange)]
    mean = total_flops / n
    return SizingReport(
        model=spec.name,
        layout=asdict(par),
        world_size=world,
        total_params=counts.total,
        active_params=counts.active,
        ns_tflop_per_step=total_flops / 1e12,
        max_rank_ns_tflop=max(flops) / 1e12,
        mean_rank_ns_tflop=mean / 1e12,
        ns_imbalance=max(flops) / mean if mean else 1.0,
        ns_seconds_at_tflops=max(flops) / (tflops * 1e12),
        tflops=tflops,
        params_per_rank=max(params),
        optimizer_state_bytes_per_rank=max(muon_state),
        adamw_optimizer_state_bytes_per_rank=max(adamw_state),
        comm_bytes_per_rank=max(comm),
        adamw_comm_bytes_per_rank=round(max(engine_comm)),
        muon_exchange_bytes_per_rank=max(exchange),
        matrices=matrices,
        per_rank=dict(
            params=params,
            ns_tflop=[f / 1e12 for f in flops],
            optimizer_state_bytes=muon_state,
            adamw_optimizer_state_bytes=adamw_state,
            comm_bytes=comm,
            adamw_comm_bytes=[round(c) for c in engine_comm],
        ),
    )


_EXPERT_SLOT = 1 << 20


def _account(numel: int, muon: bool, muon_state: list, adamw_state: list, rank: int) -> None:
    """Optimizer state of one DP-shard piece: Muon's fp32 momentum, or AdamW's two fp32 moments."""
    adamw_state[rank] += 8 * numel
    muon_state[rank] += (4 if muon else 8) * numel


# ---------------------------------------------------------------------------------------------
# Command line: ``muon-megatron plan`` (registered in muon_megatron.cli).


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plan`` subcommand's flags."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="registered model name (default moonlight-16b-a3b); see --list-models")
    src.add_argument("--megatron-args", metavar="FILE",
                     help="read the model (and --tp/--pp/--ep/--etp defaults) from a file of Megatron flags")
    src.add_argument("--list-models", action="store_true", help="print the registered models and exit")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (default 1, or the argument file's)")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size (default 1, or the argument file's)")
    parser.add_argument("--ep", type=int, help="expert-parallel size (default 1, or the argument file's)")
    parser.add_argument("--etp", type=int, help="expert tensor-parallel size (default 1, or the argument file's)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (world = tp * pp * dp)")
    parser.add_argument("--layout", choices=LAYOUTS, default="bucketed",
                        help="gradient-buffer layout to simulate (default: megatron-core's bucketed)")
    parser.add_argument("--first-stage-layers", type=int, help="layers on the first pipeline stage")
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="sustained NS TFLOP/s per GPU for the time estimate (default 400: batched bf16 on H200)")
    parser.add_argument("--ns-steps", type=int, default=5, help="Newton-Schulz steps (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--per-rank", action="store_true", help="with --json, include per-rank lists")


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def format_report(r: SizingReport) -> str:
    """The human-readable table of a :class:`SizingReport`."""
    lay = r.layout
    lines = [
        f"{r.model}: {r.total_params / 1e9:.2f} B parameters, {r.active_params / 1e9:.2f} B active per token",
        f"layout: tp={lay['tp']} pp={lay['pp']} ep={lay['ep']} etp={lay['etp']} dp={lay['dp']} "
        f"({r.world_size} GPUs, {lay['layout']} buffers), {r.matrices} Muon matrices",
        "",
        f"  parameters on the busiest rank        {r.params_per_rank / 1e9:8.3f} B",
        f"  optimizer state per rank (max)  Muon  {_gib(r.optimizer_state_bytes_per_rank):>12}",
        f"                                  AdamW {_gib(r.adamw_optimizer_state_bytes_per_rank):>12}"
        f"   (Muon / AdamW = {r.optimizer_state_bytes_per_rank / max(1, r.adamw_optimizer_state_bytes_per_rank):.2f})",
        f"  NS per step: total {r.ns_tflop_per_step:.1f} TFLOP; per rank max {r.max_rank_ns_tflop:.3f} / "
        f"mean {r.mean_rank_ns_tflop:.3f} TFLOP (imbalance {r.ns_imbalance:.3f})",
        f"  NS time on the busiest rank at {r.tflops:g} TFLOP/s: {r.ns_seconds_at_tflops * 1e3:.1f} ms",
        f"  bytes sent per optimizer step (max)  Muon {_gib(r.comm_bytes_per_rank):>12}"
        f"  = engine + {_gib(r.muon_exchange_bytes_per_rank)} Muon exchange",
        f"                                       AdamW {_gib(r.adamw_comm_bytes_per_rank):>11}"
        f"   (Muon / AdamW = {r.comm_bytes_per_rank / max(1, r.adamw_comm_bytes_per_rank):.2f})",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Execute ``plan`` for parsed ``args``; prints the report, returns the exit status."""
    from .models.argfile import ParallelArgs, read_argument_file, spec_from_megatron_args
    from .models.moonlight import MODELS, get_model

    if args.list_models:
        for name, spec in MODELS.items():
            c = count_params(spec)
            print(f"{name:22s} {_count(c.total):>9} total  {_count(c.active):>9} active")
        return 0
    found = ParallelArgs()
    try:
        if args.megatron_args:
            spec, found = spec_from_megatron_args(read_argument_file(args.megatron_args), name=args.megatron_args)
        else:
            spec = get_model(args.model or "moonlight-16b-a3b")
    except (ValueError, OSError) as err:
        print(f"muon-megatron plan: error: {err}", file=sys.stderr)
        return 2

    def pick(flag: str) -> int:
        given = getattr(args, flag)
        return given if given is not None else (getattr(found, flag) or 1)

    try:
        par = ParallelConfig(tp=pick("tp"), pp=pick("pp"), ep=pick("ep"), etp=pick("etp"), dp=args.dp,
                             layout=args.layout, first_stage_layers=args.first_stage_layers)
        report = size_model(spec, par, ns_steps=args.ns_steps, tflops=args.tflops)
    except ValueError as err:
        print(f"muon-megatron plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(per_rank=args.per_rank), indent=2))
    else:
        print(format_report(report))
    return 0
