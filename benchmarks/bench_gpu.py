"""Issue 7 measurements in one run: Newton-Schulz throughput per Moonlight shape, the Muon step
over four Moonlight MoE layers against torch.optim.Muon and DeepSpeed's muon_update, optimizer
state memory, and the end-to-end overhead of Muon over fused AdamW on a Moonlight-mini.

    python benchmarks/bench_gpu.py --out DIR            # on the H200 (see results/README.md)
    python benchmarks/bench_gpu.py --tiny --out DIR     # CPU smoke test at toy sizes

Writes DIR/results.json (everything) and DIR/summary.md (the tables); prints the tables last.
The H200 results and the exact device commands are in results/issue7_h200.md.
TFLOP/s count the dense Newton-Schulz FLOPs 20 m^2 n + 10 m^3 per matrix (MOONLIGHT.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moonlight_shapes import dense_layer_shapes, moe_layer_shapes  # noqa: E402

from muon_megatron.core import Muon, newton_schulz  # noqa: E402
from muon_megatron.core.update import update_scale  # noqa: E402
from muon_megatron.kernels import (  # noqa: E402
    BackendChooser, GraphedNewtonSchulz, MuonStepRuntime, available_backends, get_backend, ns_flops, time_call,
)

RESULTS: dict = {}
TABLES: list[str] = []
LR, WD, MU = 4.2e-4, 0.1, 0.95


def log(*a):
    print(*a, flush=True)


def save(out):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n\n".join(TABLES) + "\n")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def scaled(shape, tiny):
    return tuple(max(4, s // 32) for s in shape) if tiny else shape


def table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    TABLES.append("\n".join(lines))
    log("\n".join(lines))


# ---------------------------------------------------------------- (1) NS throughput per shape
def bench_ns(args, dev):
    cases = []
    for name, shape, count in moe_layer_shapes() + dense_layer_shapes():
        batches = sorted({count, 4 * count}) if not name.startswith("expert") else [64, 128]
        if name.startswith("dense"):
            batches = [count]
        for b in batches:
            cases.append((name, scaled(shape, args.tiny), b if not args.tiny else min(b, 8)))
    chooser = BackendChooser()
    rows, out = [], []
    backends = [n for n in ("torch_reference", "torch_baddbmm", "torch_batched", "triton_symmetric")
                if n in available_backends(dev, torch.bfloat16)]
    for name, (m, n), b in cases:
        G = torch.randn(b, m, n, device=dev)
        flops = b * ns_flops(m, n)
        rec = {"name": name, "shape": [m, n], "batch": b, "gflop": flops / 1e9, "ms": {}}
        reps = 3 if b * m * n > 2e8 else 10
        # per-matrix loop with the core's reference form: what an unbatched optimizer does
        rec["ms"]["loop"] = 1e3 * time_call(lambda: [newton_schulz(G[i]) for i in range(b)], warmup=1, reps=reps)
        for be in backends:
            fn = get_backend(be).fn
            try:
                rec["ms"][be] = 1e3 * time_call(lambda: fn(G, 5, "moonlight", torch.bfloat16), warmup=2, reps=reps)
            except Exception as err:
                rec["ms"][be] = None
                rec.setdefault("errors", {})[be] = repr(err)
        if dev.type == "cuda" and flops < 2e12:
            for be in backends[1:]:
                try:
                    g = GraphedNewtonSchulz(b, m, n, backend=be, device=dev)
                    g.input.copy_(G)
                    rec["ms"][be + "+graph"] = 1e3 * time_call(g, warmup=2, reps=20)
                    del g
                except Exception as err:
                    rec.setdefault("errors", {})[be + "+graph"] = repr(err)
        rec["chosen"] = chooser.choose(b, m, n, device=dev)
        valid = {k: v for k, v in rec["ms"].items() if v}
        best = min((k for k in valid if k != "loop"), key=valid.get)
        rec["best"] = best
        out.append(rec)
        tf = lambda ms: f"{flops / ms / 1e9:.0f}" if ms else "-"  # noqa: E731
        rows.append([name, f"{b} x {m}x{n}", f"{rec['ms']['loop']:.2f}", tf(rec["ms"]["loop"])]
                    + [tf(rec["ms"].get(be)) for be in backends]
                    + [tf(rec["ms"].get("torch_batched+graph")), tf(rec["ms"].get("triton_symmetric+graph")),
                       f"{valid[best]:.2f}", tf(valid[best]), best])
        log("ns", name, b, m, n, {k: (round(v, 3) if v else v) for k, v in rec["ms"].items()})
        del G
    RESULTS["ns_throughput"] = out
    if "triton_symmetric" in backends:
        bench_symmetric_product(dev)
    RESULTS["chooser_table"] = chooser.table
    table("(1) Newton-Schulz 5 steps, bf16: TFLOP/s (dense count 20 m^2 n + 10 m^3)",
          ["matrix", "batch x shape", "loop ms", "loop"] + backends + ["torch_batched+graph", "triton+graph",
                                                                      "best ms", "best", "best backend"], rows)


def bench_symmetric_product(dev):
    """The two symmetric products alone (one-triangle Triton vs cuBLAS full product), expert shape."""
    from muon_megatron.kernels import _triton_kernels as K
    from muon_megatron.kernels import symmetric_product
    rows = []
    rec = {}
    for b, m, k in [(128, 1408, 2048), (128, 1408, 1408), (4, 2048, 3072), (4, 576, 2048)]:
        X = torch.randn(b, m, k, device=dev, dtype=torch.bfloat16)
        flops = 2.0 * b * m * m * k  # dense count (the full product)
        t_bmm = time_call(lambda: torch.bmm(X, X.mT), warmup=3, reps=10)
        if m == k:
            t_bmm = time_call(lambda: torch.baddbmm(X, X, X, beta=-4.7, alpha=2.0), warmup=3, reps=10)
            t_tri = time_call(lambda: symmetric_product(X, X, alpha=2.0, beta=-4.7), warmup=3, reps=10)
        else:
            t_tri = time_call(lambda: symmetric_product(X), warmup=3, reps=10)
        rec[f"{b}x{m}x{k}"] = {"cublas_ms": t_bmm * 1e3, "triton_ms": t_tri * 1e3}
        rows.append([f"{b} x {m}x{k}", f"{t_bmm * 1e3:.2f}", f"{flops / t_bmm / 1e12:.0f}", f"{t_tri * 1e3:.2f}",
                     f"{flops / t_tri / 1e12:.0f}", f"{t_bmm / t_tri:.2f}"])
        del X
    rec["autotuned"] = {str(key): str(cfg) for key, cfg in K.symmetric_product_kernel.cache.items()}
    RESULTS["symmetric_product"] = rec
    table("(1b) Symmetric product X X^T (or c M M + b M when square): cuBLAS full vs one-triangle Triton, "
          "dense-count TFLOP/s", ["batch x m x k", "cuBLAS ms", "cuBLAS", "Triton ms", "Triton (dense count)",
                                  "speed-up"], rows)


# ---------------------------------------------------------------- (2) optimizer step, 4 MoE layers
def moe_params(args, dev, layers):
    specs = []
    for layer in range(layers):
        for name, shape, count in moe_layer_shapes():
            n = count if not args.tiny else min(count, 8)
            specs += [(f"l{layer}.{name}.{i}", scaled(shape, args.tiny)) for i in range(n)]
    gen = torch.Generator(device=dev).manual_seed(0)
    W = [torch.randn(s, device=dev, generator=gen).mul_(0.02) for _, s in specs]
    G = [torch.randn(s, device=dev, generator=gen) for _, s in specs]
    return specs, W, G


def check_indices(specs):
    seen, idx = set(), []
    for i, (name, s) in enumerate(specs):
        key = name.split(".")[1]
        if key not in seen:
            seen.add(key)
            idx.append(i)
    return idx


def reference_directions(W0, G, idx):
    # First step from zero momentum: Nesterov input g + mu * g, whose NS equals NS(g) (NS is
    # scale-invariant); float64 reference.
    return {i: newton_schulz(G[i].double(), dtype=torch.float64) for i in idx}


def measure(name, make_opt, step, W0, G, idx, ref, scale_fn, steps, dev, check_from_first=True):
    """Fresh weights, one checked step, then timed steps; returns a record."""
    W = [w.clone() for w in W0]
    rec = {"name": name}
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    opt = make_opt(W)
    t0 = time.perf_counter()
    step(opt, W, G)
    sync()
    rec["first_step_s"] = time.perf_counter() - t0
    after = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    rec["state_bytes"] = after - base
    errs = []
    for i in idx:
        dW = (W[i].double() - W0[i].double()) + LR * WD * W0[i].double()
        O = -dW / (LR * scale_fn(*W0[i].shape))
        errs.append(((O - ref[i]).norm() / ref[i].norm()).item())
    if dev.type == "cuda":  # transient peak of a steady-state step (the first one also tunes)
        torch.cuda.reset_peak_memory_stats()
        step(opt, W, G)
        sync()
        rec["peak_transient_bytes"] = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    else:
        rec["peak_transient_bytes"] = 0
    rec["rel_err_vs_float64"] = max(errs)
    rec["rel_err_per_shape"] = errs
    rec["ms"] = 1e3 * time_call(lambda: step(opt, W, G), warmup=1, reps=steps)
    log("step", name, {k: v for k, v in rec.items() if k != "rel_err_per_shape"})
    del opt, W
    gc.collect()
    return rec


def set_grads(W, G):
    for w, g in zip(W, G):
        w.grad = g


def bench_step(args, dev, deepspeed_only=False):
    layers = 4
    specs, W0, G = moe_params(args, dev, layers)
    idx = check_indices(specs)
    ref = reference_directions(W0, G, idx)
    nparams = sum(w.numel() for w in W0)
    moon = lambda A, B: update_scale("moonlight", A, B)  # noqa: E731
    keller = lambda A, B: math.sqrt(max(1.0, A / B))  # noqa: E731
    recs = RESULTS.setdefault("optimizer_step", {"layers": layers, "params": nparams, "records": []})["records"]
    steps = 3 if args.tiny else args.step_reps

    def tensors_as_params(W):
        return [torch.nn.Parameter(w, requires_grad=True) for w in W]

    if not deepspeed_only:
        chooser = BackendChooser()
        for label, kw in [("ours (MuonStepRuntime, auto backend)", dict(backend=chooser)),
                          ("ours, torch_batched only", dict(backend="torch_batched")),
                          ("ours, torch_baddbmm only (a X in the epilogue)", dict(backend="torch_baddbmm")),
                          ("ours, foreach element-wise, torch_batched", dict(backend="torch_batched",
                                                                             elementwise="foreach"))]:
            recs.append(measure(label, lambda W: MuonStepRuntime(W, **kw),
                                lambda opt, W, G: opt.step_(G, lr=LR, weight_decay=WD), W0, G, idx, ref, moon, steps,
                                dev))
        RESULTS["optimizer_step"]["chooser_table"] = chooser.table
        # Where our step's time goes: Newton-Schulz of each bucket alone, on its chosen backend.
        from muon_megatron.kernels import ns_buckets
        plan = ns_buckets([tuple(w.shape) for w in W0])
        ns_ms = []
        for bucket in plan.buckets:
            name = chooser.choose(bucket.batch, *bucket.shape, device=dev)
            X = torch.randn(bucket.batch, *bucket.shape, device=dev)
            fn = get_backend(name).fn
            ns_ms.append({"bucket": f"{bucket.batch} x {bucket.shape}", "backend": name,
                          "ms": 1e3 * time_call(lambda: fn(X, 5, "moonlight", torch.bfloat16), warmup=1, reps=5),
                          "tflops": bucket.useful_flops() / 1e12})
            del X
        total = sum(b["ms"] for b in ns_ms)
        RESULTS["optimizer_step"]["ours_ns_breakdown"] = ns_ms
        flops = sum(b["tflops"] for b in ns_ms)
        table("(2b) Our step, Newton-Schulz part per bucket (chosen backend)",
              ["bucket", "backend", "ms", "TFLOP/s"],
              [[b["bucket"], b["backend"], f"{b['ms']:.2f}", f"{b['tflops'] / b['ms'] * 1e3:.0f}"] for b in ns_ms]
              + [["all buckets", "", f"{total:.1f}", f"{flops / total * 1e3:.0f}"],
                 ["dense-matmul floor at the measured 8192^3 rate", "",
                  f"{flops / RESULTS['env'].get('matmul_8192_tflops', float('nan')) * 1e3:.1f}", ""]])

        def core_make(W):
            P = tensors_as_params(W)
            W[:] = P
            return Muon([{"params": P}], lr=LR, weight_decay=WD)

        def opt_step(opt, W, G):
            set_grads(W, G)
            opt.step()

        recs.append(measure("core Muon (lead's reference, batched by shape)", core_make, opt_step, W0, G, idx, ref,
                            moon, steps, dev))

        def torch_make(W):
            P = tensors_as_params(W)
            W[:] = P
            return torch.optim.Muon(P, lr=LR, weight_decay=WD, momentum=MU, nesterov=True,
                                    adjust_lr_fn="match_rms_adamw")

        recs.append(measure('torch.optim.Muon(adjust_lr_fn="match_rms_adamw")', torch_make, opt_step, W0, G, idx, ref,
                            moon, steps, dev))

        def adamw_make(W):
            P = tensors_as_params(W)
            W[:] = P
            return torch.optim.AdamW(P, lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-8,
                                     fused=dev.type == "cuda")

        r = measure("torch.optim.AdamW(fused=True)", adamw_make, opt_step, W0, G, idx, ref, moon, steps, dev)
        r["rel_err_vs_float64"] = None  # not the same update
        recs.append(r)
        # the same version timed again, last, to see the spread (METHOD.md: time twice)
        recs.append(measure("ours (MuonStepRuntime, auto backend), timed again", lambda W: MuonStepRuntime(W, backend=chooser),
                            lambda opt, W, G: opt.step_(G, lr=LR, weight_decay=WD), W0, G, idx, ref, moon, steps, dev))
    else:
        try:
            from deepspeed.runtime.zero.muon.original_muon import muon_update
        except Exception as err:
            RESULTS["optimizer_step"]["deepspeed_error"] = repr(err)
            log("deepspeed unavailable:", err)
            return
        for method in ("gram", "standard"):
            def ds_make(W):
                return [torch.zeros_like(w) for w in W]

            def ds_step(bufs, W, G, method=method):
                # As DeepSpeed's ZeRO path calls it: one matrix at a time, on a gradient copy.
                for w, g, b in zip(W, G, bufs):
                    u = muon_update(g.clone(), b, beta=MU, ns_method=method)
                    w.mul_(1 - LR * WD)
                    w.add_(u.reshape(w.shape), alpha=-LR)

            recs.append(measure(f"DeepSpeed 0.19.8 muon_update, ns_method={method!r}", ds_make, ds_step, W0, G, idx,
                                ref, keller, steps, dev))
    save(args.out)


def step_table():
    if "optimizer_step" not in RESULTS:
        return
    R = RESULTS["optimizer_step"]
    rows = []
    for r in R["records"]:
        err = r["rel_err_vs_float64"]
        rows.append([r["name"], f"{r['ms']:.1f}", f"{r['state_bytes'] / R['params']:.2f}",
                     f"{r['peak_transient_bytes'] / 2**30:.2f}", "-" if err is None else f"{err:.2e}",
                     f"{r['first_step_s']:.1f}"])
    table(f"(2, 4) Optimizer step over {R['layers']} Moonlight MoE layers ({R['params'] / 1e9:.2f} B fp32 params), "
          "target <= 150 ms",
          ["optimizer", "step ms (median)", "state bytes/param", "peak transient GiB",
           "max rel err of O vs float64", "first step s"], rows)


# ---------------------------------------------------------------- (3) end to end
class RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return torch.nn.functional.rms_norm(x, (x.size(-1),), self.weight, 1e-5)


class MoonlightLayer(torch.nn.Module):
    """A DeepseekV3/Moonlight MoE layer in plain torch (MLA without RoPE, sigmoid top-k router)."""

    def __init__(self, d, heads, nope, rope, vdim, kv_rank, experts, ffn, shared_ffn, topk):
        super().__init__()
        self.h, self.nope, self.rope, self.vdim, self.kv_rank, self.topk = heads, nope, rope, vdim, kv_rank, topk
        L = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.attn_norm, self.ffn_norm, self.kv_norm = RMSNorm(d), RMSNorm(d), RMSNorm(kv_rank)
        self.q_proj, self.kv_a_proj = L(d, heads * (nope + rope)), L(d, kv_rank + rope)
        self.kv_b_proj, self.o_proj = L(kv_rank, heads * (nope + vdim)), L(heads * vdim, d)
        self.router = L(d, experts)
        self.shared_gate, self.shared_up, self.shared_down = L(d, shared_ffn), L(d, shared_ffn), L(shared_ffn, d)
        init = lambda *s: torch.nn.Parameter(torch.randn(*s) * 0.02)  # noqa: E731
        self.w_gate, self.w_up, self.w_down = init(experts, ffn, d), init(experts, ffn, d), init(experts, d, ffn)

    def attention(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, -1).transpose(1, 2)
        c, k_rope = self.kv_a_proj(x).split([self.kv_rank, self.rope], -1)
        kv = self.kv_b_proj(self.kv_norm(c)).view(B, T, self.h, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vdim], -1)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, self.h, T, self.rope)], -1)
        v = torch.nn.functional.pad(v, (0, q.size(-1) - self.vdim))  # equal head dims: flash attention
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[..., : self.vdim]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def moe(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # grouped GEMM runs in bf16
        scores = torch.sigmoid(self.router(x).float())
        w, e = scores.topk(self.topk, -1)
        w = (w / w.sum(-1, keepdim=True) * 2.446).to(x.dtype)
        flat_e = e.reshape(-1)
        order = flat_e.argsort()
        tok = order // self.topk
        counts = torch.bincount(flat_e, minlength=self.w_gate.size(0))
        xs = x[tok]
        offs = counts.cumsum(0).to(torch.int32)
        gate = torch._grouped_mm(xs, self.w_gate.to(xs.dtype).transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(xs, self.w_up.to(xs.dtype).transpose(-2, -1), offs=offs)
        h = torch.nn.functional.silu(gate) * up
        y = torch._grouped_mm(h, self.w_down.to(h.dtype).transpose(-2, -1), offs=offs)
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, tok, y)
        shared = self.shared_down(torch.nn.functional.silu(self.shared_gate(x)) * self.shared_up(x))
        return (out + shared.to(out.dtype)).view(shape)

    def forward(self, x):
        x = x + self.attention(self.attn_norm(x))
        return x + self.moe(self.ffn_norm(x))


class MoonlightMini(torch.nn.Module):
    def __init__(self, layers, vocab, tiny):
        super().__init__()
        d = 64 if tiny else 2048
        kw = dict(heads=4 if tiny else 16, nope=16 if tiny else 128, rope=8 if tiny else 64, vdim=16 if tiny else 128,
                  kv_rank=32 if tiny else 512, experts=8 if tiny else 64, ffn=48 if tiny else 1408,
                  shared_ffn=96 if tiny else 2816, topk=2 if tiny else 6)
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(MoonlightLayer(d, **kw) for _ in range(layers))
        self.norm, self.head = RMSNorm(d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def bench_e2e(args, dev):
    layers, vocab = (2, 256) if args.tiny else (4, 32768)
    micro, seq, accum = (2, 32, 2) if args.tiny else (args.micro_batch, 2048, args.accum)
    res = RESULTS.setdefault("end_to_end", {"layers": layers, "vocab": vocab, "micro_batch": micro, "seq": seq,
                                            "accum": accum, "records": []})
    for which in ("adamw", "muon"):
        torch.manual_seed(0)
        model = MoonlightMini(layers, vocab, args.tiny).to(dev)
        muon_p = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "head" not in n]
        other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n and "head" not in n)]
        fused = dev.type == "cuda"
        if which == "adamw":
            opts = [torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.95), fused=fused)]
            step = lambda: opts[0].step()  # noqa: E731
        else:
            rt = MuonStepRuntime(muon_p, backend=BackendChooser())
            adam = torch.optim.AdamW(other, lr=LR, weight_decay=WD, betas=(0.9, 0.95), fused=fused)

            def step():
                rt.step_([p.grad for p in muon_p], lr=LR, weight_decay=WD)
                adam.step()
        ids = torch.randint(0, vocab, (accum, micro, seq + 1), device=dev)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16)
        fb_times, opt_times, totals = [], [], []
        for it in range(args.e2e_warmup + args.e2e_steps):
            sync()
            t0 = time.perf_counter()
            for a in range(accum):
                with amp:
                    logits = model(ids[a, :, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), ids[a, :, 1:].reshape(-1))
                (loss / accum).backward()
            sync()
            t1 = time.perf_counter()
            step()
            sync()
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if it >= args.e2e_warmup:
                fb_times.append(t1 - t0)
                opt_times.append(t2 - t1)
                totals.append(t2 - t0)
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        rec = {"optimizer": which, "fwd_bwd_s": med(fb_times), "opt_step_s": med(opt_times), "total_s": med(totals),
               "loss": float(loss), "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if fused else 0,
               "params": sum(p.numel() for p in model.parameters()),
               "muon_params": sum(p.numel() for p in muon_p)}
        res["records"].append(rec)
        log("e2e", rec)
        del model, step
        opts = rt = adam = None
        gc.collect()
        if fused:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if len(res["records"]) != 2:
        return
    a, m = res["records"]
    tokens = micro * seq * accum
    overhead = (m["total_s"] - a["total_s"]) / a["total_s"]
    extra = m["opt_step_s"] - a["opt_step_s"]
    per_token_fb = a["fwd_bwd_s"] / tokens
    tokens_for_3pct = extra / 0.03 / per_token_fb if per_token_fb > 0 else float("nan")
    res.update(overhead=overhead, tokens_per_step=tokens, tokens_for_3pct=tokens_for_3pct)
    table(f"(3) End to end, Moonlight-mini ({layers} MoE layers, {a['params'] / 1e9:.2f} B params, "
          f"{tokens} tokens per optimizer step = {accum} x {micro} x {seq})",
          ["optimizer", "fwd+bwd s", "optimizer step s", "whole step s", "peak GiB"],
          [[r["optimizer"], f"{r['fwd_bwd_s']:.3f}", f"{r['opt_step_s']:.3f}", f"{r['total_s']:.3f}",
            f"{r['peak_gib']:.1f}"] for r in res["records"]]
          + [["Muon overhead", "", f"+{extra * 1e3:.0f} ms", f"{100 * overhead:+.1f} %",
              f"3 % needs >= {tokens_for_3pct / 1e6:.2f} M tokens/step"]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sections", default="ns,step,e2e,deepspeed")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--e2e-steps", type=int, default=3)
    ap.add_argument("--e2e-warmup", type=int, default=2)
    ap.add_argument("--step-reps", type=int, default=5)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    RESULTS["env"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                      "argv": sys.argv, "tiny": args.tiny}
    try:
        import triton
        RESULTS["env"]["triton"] = triton.__version__
    except ImportError:
        pass
    if dev.type == "cuda":
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        ms = 1e3 * time_call(lambda: a @ a, warmup=3, reps=10)
        RESULTS["env"]["matmul_8192_tflops"] = 2 * 8192**3 / ms / 1e9
        log("dense bf16 8192^3:", RESULTS["env"]["matmul_8192_tflops"], "TFLOP/s")
        del a
    sections = args.sections.split(",")
    for sec, fn in [("ns", lambda: bench_ns(args, dev)), ("step", lambda: bench_step(args, dev)),
                    ("e2e", lambda: bench_e2e(args, dev)), ("deepspeed", lambda: bench_step(args, dev, True))]:
        if sec not in sections:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:
            RESULTS.setdefault("errors", {})[sec] = traceback.format_exc()
            log(f"section {sec} failed:\n{traceback.format_exc()}")
        RESULTS.setdefault("section_seconds", {})[sec] = time.perf_counter() - t0
        log(f"section {sec}: {time.perf_counter() - t0:.1f} s")
        save(args.out)
    step_table()
    save(args.out)
    log("\n===== SUMMARY =====")
    log("\n\n".join(TABLES))


if __name__ == "__main__":
    main()
