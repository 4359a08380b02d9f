"""muon_megatron's DeepSpeed Muon side by side with DeepSpeed's built-in Muon (issue 5).

Same model, same data, same DeepSpeed config (ZeRO stage, DP size, fp32, no clipping), only
``optimizer.params.implementation`` differs. Per implementation, in its own spawned world:

- the optimizer step (``engine.step()`` at the boundary: ZeRO's unscale/clip, the optimizer and the
  parameter all-gather), mean and min over the timed steps, max over ranks;
- matrices orthogonalised per optimizer step, summed over ranks (ours: each matrix once; the
  built-in: once per rank holding a piece of it);
- optimizer state bytes per rank, and the process's peak RSS;
- the first step's update on a matrix that straddles the ZeRO partition boundary, against the
  full-matrix Moonlight update computed in float64 from the full-batch gradient: relative error,
  the error left after the best scalar fit (direction), and the scale ratio.

    DS_ACCELERATOR=cpu python benchmarks/deepspeed_vs_builtin.py [--world 2] [--stage 1] [--hidden 512]
    python benchmarks/deepspeed_vs_builtin.py --device cuda --world 1 --hidden 2048 --layers 4 ...

``--stage 3`` runs ZeRO-3 (the built-in with ``"reduce_scatter": false``, which it requires there;
weights are gathered from the partitions for the update comparison, and every matrix is cut over
all ranks, so the first Muon matrix is the one compared). ``--gas N`` accumulates N micro-batches
per optimizer step (times and NS counts are per optimizer step; the reference update is taken on
all N x DP micro-batches). ``--variants`` runs a subset (``ours``, ``ours-fp32``,
``ours-bf16-torch``, ``ours-offload``, ``builtin``, ``adamw``); ``ours-offload`` is ours (bf16,
``ns_backend`` "auto") with ``zero_optimization.offload_optimizer`` to the CPU (stages 1-3);
``benchmarks/two_gpu.py`` runs ``ours builtin adamw`` at DP 2 on two GPUs. The JSON rows also
carry medians over the timed iterations of the per-iteration maximum over ranks (backward, step,
and forward + backward + step: ``*_median_s``) and, for ours, the bytes the busiest rank sends in
the Muon exchange per step (``muon_send_bytes_max_rank``, from its plans).

CPU by default (gloo, 127.0.0.1). ``--device cuda`` runs one rank per GPU (nccl) and adds each
variant's peak GPU memory (``torch.cuda.max_memory_allocated`` over the timed loop: weights,
gradients, optimizer state and transients). With one rank no matrix straddles a partition; every
variant's update is still compared with the float64 reference on every Muon matrix (the max over
matrices). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LR, WD, MOMENTUM = 2e-2, 0.1, 0.95
# Set in every process before NCCL starts (NVLink SHARP multicast is off on the lent GPU machines).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class BenchModel(nn.Module):
    """Embedding, ``layers`` blocks of four hidden matrices (attention-like square, MLP up and
    down), a norm and an untied head; names keep both routings (ours, DeepSpeed's) identical."""

    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        ffn = int(hidden * 2.75)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"qkv": nn.Linear(hidden, hidden, bias=False), "out": nn.Linear(hidden, hidden, bias=False),
                           "up": nn.Linear(hidden, ffn, bias=False), "down": nn.Linear(ffn, hidden, bias=False),
                           "norm": nn.LayerNorm(hidden)})
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for b in self.blocks:
            x = b["norm"](h)
            h = h + b["out"](torch.tanh(b["qkv"](x)))
            h = h + b["down"](nn.functional.gelu(b["up"](x)))
        logits = self.lm_head(self.norm(h))
        return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def batch(step: int, rank: int, args, device="cpu"):
    g = torch.Generator().manual_seed(1000 * step + rank)
    shape = (args.micro_batch, args.seq)
    return (torch.randint(0, args.vocab, shape, generator=g).to(device),
            torch.randint(0, args.vocab, shape, generator=g).to(device))


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


VARIANTS = {
    # name: (implementation, extra optimizer.params)
    "muon_megatron (NS float32)": ("muon_megatron", {"ns_dtype": "float32"}),
    "muon_megatron (NS bfloat16, torch)": ("muon_megatron", {"ns_dtype": "bfloat16", "ns_backend": "torch"}),
    "muon_megatron (NS bfloat16, auto)": ("muon_megatron", {"ns_dtype": "bfloat16", "ns_backend": "auto"}),
    "muon_megatron (NS bfloat16, offload)": ("muon_megatron", {"ns_dtype": "bfloat16", "ns_backend": "auto"}),
    "deepspeed built-in": ("deepspeed", {"betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True}),
    "AdamW (baseline)": ("adamw", {"betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True}),
}
# --variants names. "ours" is the default setting (bf16, ns_backend "auto"; on the CPU "auto" is the
# torch path, so there it runs as "ours-bf16-torch" would).
SHORT_NAMES = {
    "ours-fp32": "muon_megatron (NS float32)",
    "ours-bf16-torch": "muon_megatron (NS bfloat16, torch)",
    "ours": "muon_megatron (NS bfloat16, auto)",
    "ours-offload": "muon_megatron (NS bfloat16, offload)",
    "builtin": "deepspeed built-in",
    "adamw": "AdamW (baseline)",
}


def ds_config(args, variant: str) -> dict:
    implementation, extra = VARIANTS[variant]
    if implementation == "adamw":
        optimizer = {"type": "adamw", "params": {"lr": LR, "weight_decay": WD, **extra}}
    else:
        optimizer = {"type": "muon", "params": {"lr": LR, "weight_decay": WD, "momentum": MOMENTUM,
                                                "implementation": implementation, **extra}}
    zero = {"stage": args.stage}
    if "offload" in variant:
        zero["offload_optimizer"] = {"device": "cpu"}
    if implementation == "deepspeed" and args.stage == 3:
        zero["reduce_scatter"] = False  # DeepSpeed 0.19.8: "Muon and reduce scatter cannot be used together"
    return {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.gas,
            "gradient_clipping": 0.0, "steps_per_print": 10**9, "optimizer": optimizer,
            "zero_optimization": zero}


class _Count:
    """Counts matrices orthogonalised on this rank: ours from the runtime's per-step record
    (``MuonExchange.orthogonalized``), the built-in by its calls of ``muon_update``."""

    def __init__(self, implementation: str, engine):
        self.n = 0
        if implementation == "muon_megatron":
            for inner in engine.basic_optimizer.inner_optimizers():
                def counting(*a, _inner=inner, _step=inner.step, **k):
                    out = _step(*a, **k)
                    self.n += len(_inner.exchange.orthogonalized)
                    return out
                inner.step = counting
        elif implementation == "deepspeed":
            import deepspeed.runtime.zero.muon.original_muon as mod
            original = mod.muon_update

            def counting_update(*a, **k):
                self.n += 1
                return original(*a, **k)

            mod.muon_update = counting_update


def _muon_send_bytes(optimizer) -> int:
    """Bytes this rank sends per step in ours' Muon exchange (its plans, in the NS dtype); 0 for
    other optimizers."""
    if not hasattr(optimizer, "inner_optimizers"):
        return 0
    total = 0
    for inner in optimizer.inner_optimizers():
        element = torch.empty((), dtype=inner.ns["ns_dtype"]).element_size()
        total += inner.plan.send_bytes(element)[inner.rank]
    return total


def _snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the named parameters, gathered from ZeRO-3 partitions (collective there)."""
    params = [p for n, p in model.named_parameters() if n in names]
    if any(hasattr(p, "ds_shape") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if n in names}
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if n in names}


def _muon_names(model: nn.Module) -> list[str]:
    """The hidden matrices (before ZeRO-3 partitions them into 1-D placeholders)."""
    return [n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]


def _state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim())


def worker(rank, world, port, outdir, variant, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), **NCCL_ENV)
    torch.set_num_threads(max(1, args.threads))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    import logging

    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    import muon_megatron.deepspeed as mmds

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # gloo or nccl does the collectives: no JIT build of DeepSpeed's shared-memory all-reduce
    # (which also leaves a /dev/shm buffer per rank behind on the CPU).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    torch.manual_seed(0)
    model = BenchModel(args.vocab, args.hidden, args.layers)
    muon_names = _muon_names(model)
    engine, _, _, _ = mmds.initialize(model=model, config=ds_config(args, variant))
    device = engine.device
    counter = _Count(VARIANTS[variant][0], engine)
    before = _snapshot(model, muon_names)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []  # (backward, step, forward) per optimizer step; the built-in Muon works inside backward
    for step in range(args.warmup + args.steps + 1):
        spent = [0.0, 0.0, 0.0]
        for micro in range(args.gas):  # engine.step() is the optimizer step at the last micro-batch only
            inputs = batch(step * args.gas + micro, rank, args, device)
            _sync(cuda)
            dist.barrier()
            tf = time.perf_counter()
            loss = engine(*inputs)
            _sync(cuda)
            dist.barrier()
            t0 = time.perf_counter()
            engine.backward(loss)
            _sync(cuda)
            dist.barrier()
            t1 = time.perf_counter()
            engine.step()
            _sync(cuda)
            dist.barrier()
            spent = [spent[0] + t1 - t0, spent[1] + time.perf_counter() - t1, spent[2] + t0 - tf]
        times.append(tuple(spent))
        if step == 0:
            after = _snapshot(model, muon_names)
            first_count = counter.n
    timed = torch.tensor(times[1 + args.warmup:], dtype=torch.float64)
    stats = torch.stack([timed[:, 0].mean(), timed[:, 1].mean(), timed[:, :2].sum(1).mean(), timed[:, :2].sum(1).min()]).to(device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    # medians of the per-iteration maxima over ranks: backward, step, forward + backward + step
    per_iteration = torch.stack([timed[:, 0], timed[:, 1], timed.sum(1)], 1).to(device)
    dist.all_reduce(per_iteration, op=dist.ReduceOp.MAX)
    medians = per_iteration.cpu().median(0).values
    plan_bytes = torch.tensor([_muon_send_bytes(engine.basic_optimizer)], dtype=torch.float64, device=device)
    dist.all_reduce(plan_bytes, op=dist.ReduceOp.MAX)
    counts = torch.tensor([first_count], device=device)
    dist.all_reduce(counts)
    memory = torch.tensor([_state_bytes(engine.basic_optimizer), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                           torch.cuda.max_memory_allocated() if cuda else 0], device=device)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    if rank == 0:
        stats, memory = stats.cpu(), memory.cpu()
        torch.save({"backward_s": stats[0].item(), "step_s": stats[1].item(), "total_mean_s": stats[2].item(),
                    "total_min_s": stats[3].item(), "ns_first_step": int(counts.item()),
                    "state_bytes_max_rank": int(memory[0]), "peak_rss_bytes": int(memory[1]),
                    "peak_gpu_bytes": int(memory[2]), "before": before, "after": after,
                    "backward_median_s": medians[0].item(), "step_median_s": medians[1].item(),
                    "iteration_median_s": medians[2].item(),
                    "muon_send_bytes_max_rank": int(plan_bytes.item()) if VARIANTS[variant][0] == "muon_megatron" else None,
                    "wrapper": getattr(engine.basic_optimizer, "bound_to", None)},
                   os.path.join(outdir, f"{list(VARIANTS).index(variant)}.pt"))


def _straddling_matrix(model: nn.Module, world: int, stage: int) -> str | None:
    """The first Muon matrix cut by a DeepSpeed ZeRO partition boundary of the Muon flat group
    (None with one rank, where nothing is cut; ZeRO-3 cuts every matrix over all ranks)."""
    if world == 1:
        return None
    if stage == 3:
        return _muon_names(model)[0]
    muon = [(n, p.numel()) for n, p in model.named_parameters()
            if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    total = sum(k for _, k in muon)
    align = 2 * world
    size = -(-total // align) * align // world
    pos = 0
    for n, k in muon:
        if any(pos < b * size < pos + k for b in range(1, world)):
            return n
        pos += k
    raise RuntimeError("no Muon matrix straddles a partition boundary; change --hidden or --layers")


def reference_updates(args, names: list[str]) -> dict[str, torch.Tensor]:
    """Moonlight's first-step orthogonal part ``scale * NS(g)`` in float64 from the full-batch
    gradient (momentum starts at zero, so Nesterov's input is (1 + mu) g; NS removes the factor),
    for each matrix in ``names``; on ``args.device``, returned on the CPU."""
    from muon_megatron.core import newton_schulz, update_scale

    torch.manual_seed(0)
    model = BenchModel(args.vocab, args.hidden, args.layers).double().to(args.device)
    losses = [model(*batch(m, r, args, args.device)) for r in range(args.world) for m in range(args.gas)]
    torch.stack(losses).mean().backward()
    params = dict(model.named_parameters())
    return {n: (update_scale("moonlight", *params[n].shape)
                * newton_schulz(params[n].grad, 5, "moonlight", torch.float64)).cpu() for n in names}


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.double(), want.double()
    alpha = float((got * want).sum() / (want * want).sum())
    return {"relative_error": float((got - want).norm() / want.norm()),
            "direction_error": float((got - alpha * want).norm() / (alpha * want).norm()) if alpha else float("nan"),
            "scale_ratio": float(got.norm() / want.norm())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: gloo ranks (DS_ACCELERATOR=cpu); cuda: one rank per GPU, nccl")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--stage", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--gas", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--variants", nargs="+", choices=list(SHORT_NAMES), default=None,
                        help="run only these variants (default: all; on the CPU 'ours', ns_backend auto, is skipped "
                             "unless named, as it runs the torch path there)")
    args = parser.parse_args(argv)
    os.environ.update(NCCL_ENV)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available() or torch.cuda.device_count() < args.world:
        raise SystemExit(f"--device cuda --world {args.world}: needs {args.world} GPU(s), "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} visible")
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])

    torch.manual_seed(0)
    model = BenchModel(args.vocab, args.hidden, args.layers)
    name = _straddling_matrix(model, args.world, args.stage)
    muon_names = _muon_names(model)
    del model
    results = {}
    with tempfile.TemporaryDirectory() as outdir:
        chosen = [SHORT_NAMES[v] for v in args.variants] if args.variants else None
        for index, variant in enumerate(VARIANTS):
            if chosen is not None and variant not in chosen:
                continue
            if chosen is None and VARIANTS[variant][1].get("ns_backend") == "auto" and args.device != "cuda" \
                    and "offload" not in variant:
                continue  # off CUDA "auto" is the torch path
            if "offload" in variant and args.stage == 0:
                if chosen is not None:
                    raise SystemExit("ours-offload needs --stage 1, 2 or 3 (DeepSpeed offloads ZeRO partitions)")
                continue
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(worker, args=(args.world, port, outdir, variant, args), nprocs=args.world,
                               start_method="spawn")
            results[variant] = torch.load(os.path.join(outdir, f"{index}.pt"), weights_only=False)

    want = reference_updates(args, muon_names)
    baseline = results.get("AdamW (baseline)")
    short = {long: name for name, long in SHORT_NAMES.items()}
    rows = []
    for variant, r in results.items():
        row = {"variant": variant, "short": short[variant], "wrapper": r["wrapper"],
               **{k: v for k, v in r.items() if k not in ("before", "after")}}
        row["overhead_s"] = r["total_mean_s"] - baseline["total_mean_s"] if baseline else float("nan")
        if VARIANTS[variant][0] != "adamw":
            # what the first step added, weight decay removed
            errors = {n: compare((r["before"][n] * (1 - LR * WD) - r["after"][n]) / LR, want[n]) for n in muon_names}
            if name is not None:
                row.update(errors[name])
            row["max_relative_error_all"] = max(e["relative_error"] for e in errors.values())
            row["scale_ratio_range_all"] = (min(e["scale_ratio"] for e in errors.values()),
                                            max(e["scale_ratio"] for e in errors.values()))
        rows.append(row)
    cuda = args.device == "cuda"
    where = (f"{torch.cuda.get_device_name()} x {args.world}, nccl" if cuda else f"CPU, gloo, {args.threads} thread(s) per rank")
    print(f"\nDeepSpeed {__import__('deepspeed').__version__}, torch {torch.__version__}, {where}, ZeRO-{args.stage}, "
          f"DP {args.world}, hidden {args.hidden}, {args.layers} layers ({len(muon_names)} Muon matrices), vocab "
          f"{args.vocab}, micro-batch {args.micro_batch} x {args.seq} x {args.gas} accumulated, fp32 weights, "
          f"{args.steps} timed steps; "
          f"straddling matrix: {name or 'none (one rank)'}\n")
    straddle = ["straddler rel. error", "direction error", "scale ratio"] if name else []
    heads = (["variant", "backward / step (ms)", "backward + step mean / min (ms)", "over AdamW (ms)",
              "matrices orthogonalised per step (all ranks)", "optimizer state MiB (max rank)"]
             + (["peak GPU memory MiB"] if cuda else ["peak RSS MiB"]) + straddle
             + ["max rel. error, all Muon matrices", "scale ratio range"])
    print("| " + " | ".join(heads) + " |")
    print("|" + " --- |" * len(heads))
    for r in rows:
        cells = [r["variant"], f"{1e3 * r['backward_s']:.1f} / {1e3 * r['step_s']:.1f}",
                 f"{1e3 * r['total_mean_s']:.1f} / {1e3 * r['total_min_s']:.1f}", f"{1e3 * r['overhead_s']:+.1f}",
                 str(r["ns_first_step"]), f"{r['state_bytes_max_rank'] / 2**20:.2f}",
                 f"{(r['peak_gpu_bytes'] if cuda else r['peak_rss_bytes']) / 2**20:.0f}"]
        if name:
            cells += ([f"{r['relative_error']:.2e}", f"{r['direction_error']:.2e}", f"{r['scale_ratio']:.3f}"]
                      if "relative_error" in r else ["-"] * 3)
        cells += ([f"{r['max_relative_error_all']:.2e}", "{:.3f} - {:.3f}".format(*r["scale_ratio_range_all"])]
                  if "max_relative_error_all" in r else ["-", "-"])
        print("| " + " | ".join(cells) + " |")
    print("\nUpdate errors: the first step's orthogonal part against Moonlight's 0.2 sqrt(max(A, B)) NS5(g) in "
          "float64 from the full-batch gradient; direction error is what remains after the best scalar fit, scale "
          "ratio is norm(update) / norm(reference).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "straddling_matrix": name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
