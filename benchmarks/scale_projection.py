"""Muon's step for Moonlight-16B-A3B at DP 8, 64 and 512 (EP 8), projected from measurements on
two GPUs (issue 14, item 4).

    python benchmarks/scale_projection.py --out DIR            # 2 GPUs, NCCL (about a minute)
    python benchmarks/scale_projection.py --tiny --out DIR     # CPU dry run: gloo, Moonlight-mini

What is measured, and how the step is modelled (every assumption is a flag and lands in the JSON):

1. **Plan.** For each DP size, the layout megatron-core gives Moonlight-16B-A3B under
   ``--expert-model-parallel-size 8`` (dense weights in one gradient buffer sharded over DP;
   each EP rank's 8 experts per layer in an expert buffer sharded over the DP / 8 expert-data
   ranks; ``--layout`` bucketed = megatron-core's buckets, or aligned) is planned with the
   distributed engine's planner (``muon_megatron.distributed.make_plan``), exactly as the sizing
   model (``muon-megatron plan``) does it; the per-rank Newton-Schulz FLOPs and exchange bytes are
   checked against that model's. Two plans: the sizing model's one plan over all ranks, and the
   Megatron adapter's (a dense plan over DP and an expert plan per EP group, as
   ``get_muon_optimizer`` builds two ``DistributedMuon`` s); the busier is projected.
2. **Newton-Schulz**: the busiest rank's buckets (shape x count), cut into calls of at most 128
   matrices as the runtime does, run on one GPU in bf16 through the adapters' default
   orthogonaliser (``muon_megatron.kernels.orthogonalizer("auto")``: the fastest backend per
   bucket, timed once by ``BackendChooser``); median of ``--reps`` runs after a warm-up.
3. **Bandwidth**: all-to-all (``all_to_all_single``, the runtime's exchange) and all-gather
   (``all_gather_into_tensor``) between the two GPUs with NCCL, at the message sizes the plans
   imply (each rank sends that many bytes to the other), median of 10. The Muon exchange of the
   busiest rank (gather + return, bf16) costs its bytes / the all-to-all bandwidth at that size.
   Two GPUs of one host talk over NVLink; across nodes a GPU has its NIC's bandwidth, so the
   exchange is also shown at ``--network-gbs`` (default 50 GB/s: one 400 Gb/s NIC per GPU),
   an assumption, not a measurement.
4. **Element-wise work** (momentum, decay, apply, AdamW) is memory-bound: bytes / the measured
   HBM bandwidth of a device-to-device copy (2 bytes moved per byte copied). Per element of the
   rank's distributed-optimizer shard: AdamW 30 B (fp32 grad read 4, master read+write 8, two
   moments read+write 16, bf16 param write 2); Muon 26 B (grad 4, momentum read+write 8, bf16 NS
   input write 2 and result read 2, master 8, bf16 param 2); AdamW's parameters in a Muon run
   (embeddings, head, norms) at 30 B. Shard sizes from the sizing model (per-rank optimizer state).
5. **Muon step** = NS time of the busiest rank + its exchange + its element-wise work (the three
   maxima added: an upper bound; the runtime overlaps part of the exchange with NS). **AdamW
   step** = its element-wise work. The engine's gradient reduce-scatter and parameter all-gather
   are the same for both and left out of both.
6. **Training step** (forward + backward) = 6 x N x tokens per rank / (measured bf16 matmul rate x
   ``--mfu``, default 0.40), N = the parameters one token multiplies (``count_params`` active,
   less the input embedding, which is a lookup); tokens per rank = 4096 x 8192 / DP, Moonlight's
   batch after its first 200 B tokens (shared/MOONLIGHT.md). Attention's own FLOPs are left out,
   so the step is underestimated and Muon's share overestimated.

Target (issue 14): the Muon step at most 1 % of the training step at DP 64. Writes
DIR/projection.json and DIR/projection.md and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from worlds import init_process_group, log, median, run_world, set_process_env  # noqa: E402

BATCH_SEQUENCES, SEQ_LEN = 4096, 8192
ADAMW_BYTES_PER_ELEMENT, MUON_BYTES_PER_ELEMENT = 30, 26
NS_BYTES = 2  # the exchange travels in the NS dtype (bf16)
MAX_BATCH = 128  # DistributedMuon's default chunk of one Newton-Schulz call


def _sizing():
    """The sizing model (``muon-megatron plan``): ``(ParallelConfig, size_model)``."""
    from muon_megatron.sizing import ParallelConfig, size_model

    return ParallelConfig, size_model


# ---------------------------------------------------------------------------------------------
# Plans (pure; no processes)


def _locals_for_buffer(weights_, experts=None):
    """``(key, full_shape, split, use_muon, numel)`` of the local tensors of one gradient buffer
    at TP 1: dense weights whole (norms as (1, n)); with ``experts``, each routed expert of the
    stacked weights as its own parameter, named by its global index (as the sizing model does)."""
    from muon_megatron.core import ExpertStack, GateUp, Whole

    out = []
    for w in weights_:
        muon = getattr(w, "use_muon", getattr(w, "muon", False))
        if experts is None:
            if len(w.shape) == 1:
                out.append((w.name, (1, w.shape[0]), Whole(), False, w.shape[0]))
            else:
                split = GateUp(num_shards=1) if isinstance(w.split, GateUp) else (w.split or Whole())
                out.append((w.name, tuple(w.shape), split, muon, w.shape[0] * w.shape[1]))
            continue
        _, rows, cols = w.shape
        inner = w.split.inner if isinstance(w.split, ExpertStack) else None
        split = GateUp(num_shards=1) if isinstance(inner, GateUp) else Whole()
        for g in experts:
            key = w.name.replace("mlp.experts.", f"mlp.experts.expert{g}.") + ".weight"
            out.append((key, (rows, cols), split, muon, rows * cols))
    return out


def _buffer_holdings(locals_, group: int, layout: str, ranks, slot_base: int = 0):
    """Holdings of one buffer sharded over ``group`` ranks (global rank ids ``ranks``)."""
    from muon_megatron.core import Whole
    from muon_megatron.distributed import AlignItem, ParamLayout, ParamSpec, aligned_layout, bucketed_layouts, holdings

    per_rank = [[] for _ in range(group)]
    muon = [loc for loc in locals_ if loc[3]]
    if layout == "aligned":
        # Muon tensors in a buffer of their own, each whole in one partition (AdamW ones apart).
        aligned = aligned_layout([AlignItem.of(k, s, sp) for k, s, sp, _, _ in muon], group)
        size = aligned.partition_size
        for key, shape, split, _, numel in muon:
            lo = aligned.offsets[key]
            for r in range(lo // size, min(group, -(-(lo + numel) // size))):
                a, b = max(lo, r * size) - lo, min(lo + numel, (r + 1) * size) - lo
                if b > a:
                    per_rank[r].append(ParamLayout(key, shape, split, None, None if (a, b) == (0, numel) else (a, b)))
    else:
        # Megatron's buckets over every tensor of the buffer (AdamW ones take space too).
        specs = [ParamSpec(k, (1, n), Whole(), True) for k, _, _, _, n in locals_]
        by_key = {loc[0]: loc for loc in locals_}
        for r, layouts in enumerate(bucketed_layouts(specs, group)):
            for pl in layouts:
                key, shape, split, use_muon, _ = by_key[pl.key]
                per_rank[r].append(ParamLayout(key, shape, split, None, pl.flat_range) if use_muon else None)
    out = []
    for r, layouts in enumerate(per_rank):
        for slot, pl in enumerate(layouts):
            if pl is not None:
                out += holdings(pl, ranks[r], slot_base + slot)
    return out


def _reindex(hs, ranks):
    """Holdings with global rank ids mapped to positions in ``ranks`` (a process group)."""
    from dataclasses import replace

    where = {r: i for i, r in enumerate(ranks)}
    return [replace(h, rank=where[h.rank]) for h in hs]


def plans_for(spec, dp: int, ep: int, layout: str):
    """``(joint plan, adapter plans)`` for ``spec`` at TP 1, PP 1, DP ``dp``, EP ``ep``.

    joint: one plan over the ``dp`` ranks (the sizing model's). adapter: ``[(plan, global ranks)]``,
    the dense plan over all ranks and one expert plan per EP rank over its expert-data ranks."""
    from muon_megatron.distributed import make_plan
    from muon_megatron.models import weights

    if spec.moe is None or spec.moe.num_experts % ep or dp % ep:
        raise ValueError(f"--ep {ep} must divide the experts and the DP size {dp}")
    all_weights = weights(spec)
    dense = [w for w in all_weights if not w.expert]
    expert = [w for w in all_weights if w.expert]
    edp = dp // ep
    per_ep = spec.moe.num_experts // ep
    dense_h = _buffer_holdings(_locals_for_buffer(dense), dp, layout, list(range(dp)))
    expert_groups = []
    for e in range(ep):
        ranks = [j * ep + e for j in range(edp)]  # expert ranks: EP fastest, then expert-DP
        locals_ = _locals_for_buffer(expert, experts=range(e * per_ep, (e + 1) * per_ep))
        expert_groups.append((ranks, _buffer_holdings(locals_, edp, layout, ranks, slot_base=1 << 20)))
    joint = make_plan(dense_h + [h for _, hs in expert_groups for h in hs], dp)
    adapter = [(make_plan(dense_h, dp), list(range(dp)))]
    adapter += [(make_plan(_reindex(hs, ranks), edp), ranks) for ranks, hs in expert_groups]
    return joint, adapter


def rank_work(plans_with_ranks, dp: int):
    """Per global rank: NS FLOPs, ``Counter`` of owned shapes, gather and return elements."""
    flops = [0.0] * dp
    shapes = [Counter() for _ in range(dp)]
    gather, back = [0] * dp, [0] * dp
    for plan, ranks in plans_with_ranks:
        for local, r in enumerate(ranks):
            flops[r] += plan.flops[local]
            gather[r] += plan.gather_elems[local]
            back[r] += plan.return_elems[local]
            for shape, indices in plan.buckets[local]:
                shapes[r][tuple(shape)] += len(indices)
    return flops, shapes, gather, back


def plan_dp(spec, dp: int, ep: int, layout: str) -> dict:
    """The projection's inputs for one DP size (pure planning, checked against the sizing model)."""
    ParallelConfig, size_model = _sizing()
    began = time.perf_counter()
    joint, adapter = plans_for(spec, dp, ep, layout)
    report = size_model(spec, ParallelConfig(dp=dp, ep=ep, layout=layout))
    want = report.per_rank["ns_tflop"]
    j_flops, j_shapes, j_gather, j_back = rank_work([(joint, list(range(dp)))], dp)
    worst = max(abs(a / 1e12 - b) / max(b, 1e-12) for a, b in zip(j_flops, want))
    exchange = [c - a for c, a in zip(report.per_rank["comm_bytes"], report.per_rank["adamw_comm_bytes"])]
    if worst > 1e-9 or any(abs(NS_BYTES * (g + r) - x) > 1 for g, r, x in zip(j_gather, j_back, exchange)):
        raise RuntimeError(
            f"the simulated layout at DP {dp} disagrees with the sizing model (NS FLOPs off by {worst:.2e} "
            "relative, or exchange bytes): muon_megatron's sizing simulation changed; update plans_for()")
    a_flops, a_shapes, a_gather, a_back = rank_work(adapter, dp)
    out = {"dp": dp, "ep": ep, "layout": layout, "plan_s": time.perf_counter() - began,
           "matrices": len(joint.matrices), "ns_tflop_total": sum(j_flops) / 1e12}
    for name, (flops, shapes, gather, back) in (("joint", (j_flops, j_shapes, j_gather, j_back)),
                                                ("adapter", (a_flops, a_shapes, a_gather, a_back))):
        busy = max(range(dp), key=lambda r: flops[r])
        loud = max(range(dp), key=lambda r: gather[r] + back[r])
        out[name] = {
            "busiest_rank": busy, "busiest_tflop": flops[busy] / 1e12, "mean_tflop": sum(flops) / dp / 1e12,
            "buckets": sorted(([list(s), c] for s, c in shapes[busy].items()), key=lambda t: -t[1]),
            "exchange_rank": loud, "gather_bytes": NS_BYTES * gather[loud], "return_bytes": NS_BYTES * back[loud],
        }
    state = report.per_rank["optimizer_state_bytes"]
    adamw_state = report.per_rank["adamw_optimizer_state_bytes"]
    muon_elems = [(a - m) // 4 for m, a in zip(state, adamw_state)]
    other_elems = [a // 8 - mu for a, mu in zip(adamw_state, muon_elems)]
    out["elementwise_bytes_muon"] = max(MUON_BYTES_PER_ELEMENT * mu + ADAMW_BYTES_PER_ELEMENT * o
                                        for mu, o in zip(muon_elems, other_elems))
    out["elementwise_bytes_adamw"] = max(ADAMW_BYTES_PER_ELEMENT * a // 8 for a in adamw_state)
    out["shard_elements_max"] = max(a // 8 for a in adamw_state)
    out["sizing_max_rank_tflop"] = report.max_rank_ns_tflop
    return out


# ---------------------------------------------------------------------------------------------
# Measurements (inside a spawned world of two ranks)


def _buckets_to_time(entry: dict) -> list[list]:
    """The busier plan's buckets (the one whose busiest rank has more NS FLOPs)."""
    which = "adapter" if entry["adapter"]["busiest_tflop"] >= entry["joint"]["busiest_tflop"] else "joint"
    entry["projected_plan"] = which
    return entry[which]["buckets"]


def _time_ns(buckets, device, reps: int, tiny: bool) -> dict:
    import torch

    from muon_megatron.kernels import orthogonalizer, time_call

    ortho = orthogonalizer("auto")  # what get_muon_optimizer and the DeepSpeed adapter use by default
    calls = []
    for (m, n), count in buckets:
        if tiny:
            m, n = max(4, m // 16), max(4, n // 16)
        X = torch.randn(count, m, n, device=device, dtype=torch.bfloat16)
        for start in range(0, count, MAX_BATCH):
            calls.append(list(X[start:start + MAX_BATCH].unbind(0)))

    def work():
        for chunk in calls:
            ortho(chunk, steps=5, coefficients="moonlight", dtype=torch.bfloat16)

    began = time.perf_counter()
    work()  # backend choice (timed once per bucket shape) and Triton compilation
    first = time.perf_counter() - began
    seconds = time_call(work, warmup=1, reps=reps)
    chosen = dict(getattr(getattr(ortho, "chooser", None), "table", {}) or {})
    calls.clear()  # free the inputs before the next DP size
    return {"seconds": seconds, "first_call_s": first, "backends": chosen}


def _bandwidth(kind: str, nbytes: int, device, reps: int = 10) -> float:
    """Bytes per second one rank sends to the other (2 ranks), median of ``reps``."""
    import torch
    import torch.distributed as dist

    elems = max(1, nbytes // 2)
    if kind == "all_to_all":
        send = torch.ones(2 * elems, dtype=torch.bfloat16, device=device)
        recv = torch.empty_like(send)
        fn = lambda: dist.all_to_all_single(recv, send)  # noqa: E731 - half to self, half to the peer
    else:
        send = torch.ones(elems, dtype=torch.bfloat16, device=device)
        recv = torch.empty(2 * elems, dtype=torch.bfloat16, device=device)
        fn = lambda: dist.all_gather_into_tensor(recv, send)  # noqa: E731
    times = []
    for i in range(reps + 3):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    t = torch.tensor([median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return 2 * elems / float(t)


def _hbm_and_matmul(device, tiny: bool) -> dict:
    import torch

    from muon_megatron.kernels import time_call

    n = (1 << 22) if tiny else (1 << 30)  # bf16 elements: 8 MiB / 2 GiB
    a = torch.ones(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    copy = time_call(lambda: b.copy_(a), warmup=3, reps=10)
    a.resize_(0)
    b.resize_(0)
    k = 512 if tiny else 8192
    x = torch.randn(k, k, dtype=torch.bfloat16, device=device)
    y = torch.randn(k, k, dtype=torch.bfloat16, device=device)
    mm = time_call(lambda: x @ y, warmup=3, reps=10)
    return {"hbm_bytes_per_s": 2 * 2 * n / copy, "copy_bytes": 2 * n, "matmul_flops_per_s": 2 * k ** 3 / mm,
            "matmul_size": k}


def measure_worker(rank: int, world: int, entries: list, sizes: list, args: dict, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    cuda = not args["tiny"]
    if not cuda:
        torch.set_num_threads(1)
    init_process_group(rank, world, cuda, timeout_s=900)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    result = {"ns": {}, "bandwidth": {}}
    try:
        if rank == 0:
            result.update(_hbm_and_matmul(device, args["tiny"]))
            log(f"  HBM copy {result['hbm_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul "
                f"{result['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s")
            for entry in entries:
                buckets = _buckets_to_time(entry)
                timed = _time_ns(buckets, device, args["reps"], args["tiny"])
                result["ns"][entry["dp"]] = {**timed, "plan": entry["projected_plan"]}
                log(f"  DP {entry['dp']}: NS of the busiest rank ({entry['projected_plan']} plan, "
                    f"{entry[entry['projected_plan']]['busiest_tflop']:.3g} TFLOP) {1e3 * timed['seconds']:.1f} ms "
                    f"(first call {timed['first_call_s']:.1f} s)")
                if cuda:
                    torch.cuda.empty_cache()
        dist.barrier()
        for nbytes in sizes:
            for kind in ("all_to_all", "all_gather"):
                result["bandwidth"][f"{kind}:{nbytes}"] = _bandwidth(kind, nbytes, device)
            if rank == 0:
                log(f"  {nbytes / 1e6:9.2f} MB: all-to-all {result['bandwidth'][f'all_to_all:{nbytes}'] / 1e9:.1f} GB/s, "
                    f"all-gather {result['bandwidth'][f'all_gather:{nbytes}'] / 1e9:.1f} GB/s")
        if rank == 0:
            result["device"] = torch.cuda.get_device_name(device) if cuda else "CPU"
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------


def _clip_size(nbytes: int, tiny: bool) -> int:
    hi = (8 << 20) if tiny else (2 << 30)
    return int(min(max(nbytes, 1 << 20), hi))


def project(entries: list, measured: dict, spec, args) -> list[dict]:
    from muon_megatron.models import weights

    flop_params = sum(w.active_numel for w in weights(spec) if w.kind != "embedding")
    rate = measured["matmul_flops_per_s"] * args.mfu
    hbm = measured["hbm_bytes_per_s"]
    rows = []
    for e in entries:
        which = e["projected_plan"]
        p = e[which]
        tokens = BATCH_SEQUENCES * SEQ_LEN // e["dp"]
        train = 6 * flop_params * tokens / rate
        ns = measured["ns"][str(e["dp"])]["seconds"]  # JSON keys are strings
        a2a = lambda b: b / measured["bandwidth"][f"all_to_all:{_clip_size(b, args.tiny)}"] if b else 0.0  # noqa: E731
        exchange = a2a(p["gather_bytes"]) + a2a(p["return_bytes"])
        exchange_net = (p["gather_bytes"] + p["return_bytes"]) / (args.network_gbs * 1e9)
        elementwise = e["elementwise_bytes_muon"] / hbm
        adamw = e["elementwise_bytes_adamw"] / hbm
        muon = ns + exchange + elementwise
        muon_net = ns + max(exchange, exchange_net) + elementwise
        rows.append({
            "dp": e["dp"], "ep": e["ep"], "plan": which, "tokens_per_rank": tokens,
            "busiest_tflop": p["busiest_tflop"], "mean_tflop": p["mean_tflop"],
            "ns_s": ns, "ns_tflops": p["busiest_tflop"] * 1e12 / ns / 1e12 if ns else None,
            "exchange_bytes": p["gather_bytes"] + p["return_bytes"], "exchange_s": exchange,
            "exchange_network_s": exchange_net, "elementwise_s": elementwise, "muon_step_s": muon,
            "muon_step_network_s": muon_net, "adamw_step_s": adamw, "train_step_s": train,
            "muon_share": muon / (train + muon), "muon_share_network": muon_net / (train + muon_net),
            "muon_over_adamw_share": (muon - adamw) / (train + adamw),
        })
    return rows


def table(rows: list[dict], measured: dict, spec, args) -> str:
    where = ("the CPU (gloo ranks; --tiny: Moonlight-mini, NS shapes scaled down 16x)" if args.tiny
             else "one GPU")
    lines = [
        f"## Muon step for {spec.name}, projected (EP {args.ep}, {args.layout} buffers)", "",
        f"Measured on {measured.get('device', '?')}: bf16 matmul {measured['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s "
        f"({measured['matmul_size']}^3), HBM copy {measured['hbm_bytes_per_s'] / 1e9:.0f} GB/s; Newton-Schulz of the "
        f"busiest rank's buckets on {where}; exchange at the all-to-all bandwidth measured between the two ranks at "
        f"that message size (two GPUs of one host: NVLink), and at {args.network_gbs:g} GB/s (assumed inter-node "
        f"NIC). Training step = 6 N tokens / ({args.mfu:.0%} of the measured matmul rate), batch "
        f"{BATCH_SEQUENCES} x {SEQ_LEN}.", "",
        "| DP | tokens / rank | busiest rank NS TFLOP (mean) | NS ms | exchange MB | exchange ms (NVLink / network) | "
        "element-wise ms | Muon step ms | AdamW step ms | training step s | Muon share (NVLink / network) | "
        "Muon - AdamW share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["dp"]), f"{r['tokens_per_rank']:,}", f"{r['busiest_tflop']:.3g} ({r['mean_tflop']:.3g})",
            f"{1e3 * r['ns_s']:.1f}", f"{r['exchange_bytes'] / 1e6:,.1f}",
            f"{1e3 * r['exchange_s']:.1f} / {1e3 * r['exchange_network_s']:.1f}", f"{1e3 * r['elementwise_s']:.1f}",
            f"{1e3 * r['muon_step_s']:.1f}", f"{1e3 * r['adamw_step_s']:.1f}", f"{r['train_step_s']:.2f}",
            f"{100 * r['muon_share']:.3f} % / {100 * r['muon_share_network']:.3f} %",
            f"{100 * r['muon_over_adamw_share']:.3f} %",
        ]) + " |")
    at64 = [r for r in rows if r["dp"] == 64]
    if at64:
        r = at64[0]
        verdict = "met" if max(r["muon_share"], r["muon_share_network"]) <= 0.01 else "NOT met"
        lines += ["", f"Target (Muon step at most 1 % of the step at DP 64): {verdict} "
                      f"({100 * r['muon_share']:.3f} % with the NVLink exchange, {100 * r['muon_share_network']:.3f} % "
                      f"at {args.network_gbs:g} GB/s)."]
    bw = measured["bandwidth"]
    sizes = sorted({int(k.split(":")[1]) for k in bw})
    lines += ["", "Bandwidth between the two GPUs (bytes one rank sends / time): " + "; ".join(
        f"{s / 1e6:.1f} MB: all-to-all {bw[f'all_to_all:{s}'] / 1e9:.0f} GB/s, all-gather "
        f"{bw[f'all_gather:{s}'] / 1e9:.0f} GB/s" for s in sizes)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for projection.json and projection.md")
    parser.add_argument("--dp", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--layout", choices=("bucketed", "aligned"), default="bucketed",
                        help="gradient-buffer layout (bucketed: megatron-core's, the adapter's 'gather'; aligned: "
                             "every matrix whole in one DP shard)")
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOP utilisation of the training step")
    parser.add_argument("--network-gbs", type=float, default=50.0,
                        help="assumed per-GPU inter-node bandwidth for the exchange at scale, GB/s")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of the Newton-Schulz work")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--tiny", action="store_true",
                        help="CPU dry run: Moonlight-mini's plans, gloo, shapes scaled down 16x for the NS timing")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error("--mfu must be in (0, 1]")
    if any(d % args.ep for d in args.dp):
        parser.error(f"every --dp must be a multiple of --ep {args.ep}")
    set_process_env()
    import torch

    from muon_megatron.models import get_model

    if not args.tiny and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        raise SystemExit("scale_projection.py needs 2 CUDA devices (or --tiny for the CPU dry run)")
    os.makedirs(args.out, exist_ok=True)
    spec = get_model("moonlight-mini" if args.tiny else "moonlight-16b-a3b")
    started = time.perf_counter()
    entries = []
    for dp in args.dp:
        entry = plan_dp(spec, dp, args.ep, args.layout)
        entries.append(entry)
        j, a = entry["joint"], entry["adapter"]
        log(f"[plan] DP {dp}: {entry['matrices']} matrices, {entry['ns_tflop_total']:.3g} TFLOP; busiest rank "
            f"{j['busiest_tflop']:.3g} TFLOP (joint plan) / {a['busiest_tflop']:.3g} (adapter's plans), buckets "
            f"{a['buckets'][:4]}{' ...' if len(a['buckets']) > 4 else ''}; exchange "
            f"{(a['gather_bytes'] + a['return_bytes']) / 1e6:.1f} MB ({entry['plan_s']:.1f} s)")
    sizes = sorted({_clip_size(e[w][k], args.tiny) for e in entries for w in ("joint", "adapter")
                    for k in ("gather_bytes", "return_bytes") if e[w][k]} | {_clip_size(1 << 20, args.tiny)})
    out_path = os.path.join(args.out, "measured.json")
    ok, message = run_world(measure_worker, 2, (entries, sizes, {"tiny": args.tiny, "reps": args.reps}, out_path),
                            cuda=not args.tiny, timeout=args.timeout)
    if not ok:
        raise SystemExit(f"the measurement world failed:\n{message}")
    with open(out_path) as f:
        measured = json.load(f)
    for e in entries:
        _buckets_to_time(e)
    rows = project(entries, measured, spec, args)
    text = table(rows, measured, spec, args)
    with open(os.path.join(args.out, "projection.json"), "w") as f:
        json.dump({"args": vars(args), "model": spec.name, "plans": entries, "measured": measured, "rows": rows,
                   "accounting": {"adamw_bytes_per_element": ADAMW_BYTES_PER_ELEMENT,
                                  "muon_bytes_per_element": MUON_BYTES_PER_ELEMENT,
                                  "batch": [BATCH_SEQUENCES, SEQ_LEN]},
                   "total_s": time.perf_counter() - started}, f, indent=1)
    with open(os.path.join(args.out, "projection.md"), "w") as f:
        f.write(text + "\n")
    log(f"[scale_projection] took {time.perf_counter() - started:.0f} s; wrote {args.out}/projection.json, projection.md\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
