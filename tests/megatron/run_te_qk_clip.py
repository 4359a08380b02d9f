"""QK-Clip with Transformer Engine attention, on GPUs (a check script, not part of the CPU suite).

    python tests/megatron/run_te_qk_clip.py --spec te --backend nccl --world 2     # two GPUs, TP 2
    python tests/megatron/run_te_qk_clip.py --spec local --backend gloo --world 2  # its dry run on the CPU

With ``--spec te`` the tiny GQA GPT of ``mcore_models`` is built from megatron-core's Transformer
Engine layer spec with ``log_max_attention_logit`` (Transformer Engine >= 2.9 then returns each
head's max logit, ``return_max_logit``, and the adapter reads it from megatron-core's
``TEDotProductAttention.current_max_attn_logits``); ``--spec local`` uses the local spec (the
adapter's own hook), which runs on the CPU. Tensor parallel = ``--world``; fp32 and bf16 models.

Per case, a one-layer model, on the same batch three times with learning rate 0 (so only QK-Clip changes weights):
step 0 with tau above everything measures S0; tau is then set to the median of S0; step 1 measures
S1 and clips; step 2 measures S2 from the clipped weights. Checks:

- S0 equals the float64 max of ``q . k / sqrt(d)`` (causal) over the q and k the core attention
  received (fp32: 1e-5 relative; bf16: 2e-2, Transformer Engine's kernels round differently);
- S1 equals S0 (nothing changed before the clip);
- in S2 every head above tau in S1 is at tau and every other head at its S1 value (fp32: 1e-5;
  bf16: 2e-2, the clipped weights are rounded to bf16).

Writes ``--out/te_qk_clip.json``. Exit status 0 when every check passes, 1 when one fails, 3 when
``--spec te`` finds no Transformer Engine >= 2.9 (nothing checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import mcore_models as mm  # noqa: E402
import mcore_qk_clip as mq  # noqa: E402
from mcore_harness import run_world  # noqa: E402

TOL = {"fp32": 1e-5, "bf16": 2e-2}


def te_version() -> str | None:
    """Transformer Engine's version when >= 2.9 is importable, else None."""
    try:
        from megatron.core.utils import get_te_version

        found = get_te_version()
    except Exception:  # noqa: BLE001 - no TE, or no megatron-core: nothing to check
        return None
    return str(found) if found.release >= (2, 9) else None


def _build(spec_kind: str, precision: str):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs

    # one layer: a second layer's input would change with the first layer's clip, and the check
    # compares max logits of the same inputs
    spec = mm.TinySpec(num_layers=1)
    extra = dict(log_max_attention_logit=True) if spec_kind == "te" else {}
    config = mm.transformer_config(spec, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(), **extra)
    if precision == "bf16":
        config = dataclasses.replace(config, bf16=True, params_dtype=torch.bfloat16)
    if spec_kind == "te":
        layer_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    torch.manual_seed(spec.seed)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=spec.vocab_size,
                     max_sequence_length=spec.seq_length, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    if torch.distributed.get_backend() == "nccl":
        model = model.cuda()
    mq.boost_(model)
    return spec, model


def _core_max(capture, name, m) -> torch.Tensor:
    """float64 per-head max logit (this rank's heads) of the captured core-attention q and k."""
    rep = m.num_attention_heads_per_partition // m.num_query_groups_per_partition
    scale = 1.0 / math.sqrt(m.hidden_size_per_attention_head)
    return torch.stack([mq._causal_max(q, k.repeat_interleave(rep, dim=2), scale)
                        for q, k in capture.core[name]]).amax(0).cpu()


def check_worker(rank, world, spec_kind, precision):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    from muon_megatron.megatron import MuonSettings, get_muon_optimizer

    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    spec, model = _build(spec_kind, precision)
    chunk = model
    if precision == "bf16":
        from megatron.core.transformer.module import Float16Module

        chunk = Float16Module(model.config, model)
    ddp = DDP(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
              chunk)
    config = OptimizerConfig(optimizer="muon", lr=0.0, min_lr=0.0, weight_decay=0.0, use_distributed_optimizer=True,
                             bf16=precision == "bf16", clip_grad=1.0)
    opt = get_muon_optimizer(config, [ddp], MuonSettings(ns_dtype="float32", qk_clip_threshold=1e9))
    inner = opt.chained_optimizers[0].optimizer
    clip = inner.qk_clip
    sources = sorted({layer.source for layer in clip.layers})
    layers = mq.attention_layers(model)
    capture = mq.Capture(model)
    device = next(model.parameters()).device
    tokens = mm.batch(0, spec).to(device)
    maxima, core = [], None
    for step in range(3):
        capture.clear()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        mm.loss_of(ddp, tokens).backward()
        finalize_model_grads([ddp])
        ok, _, _ = opt.step()
        assert ok, "the optimizer step was skipped"
        maxima.append({k: v.tolist() for k, v in clip.last_maxima.items()})
        if step == 0:
            with torch.no_grad():
                core = {f"layer{m.layer_number}": _core_max(capture, n, m).tolist() for n, m in layers}
            values = sorted(v for S in maxima[0].values() for v in S)
            clip.tau = float((values[len(values) // 2 - 1] + values[len(values) // 2]) / 2)
    capture.remove()
    first = {f"layer{m.layer_number}": ps.get_tensor_model_parallel_rank() * m.num_attention_heads_per_partition
             for _, m in layers}
    return {"sources": sources, "tau": clip.tau, "maxima": maxima, "core": core, "first": first}


def evaluate(per_rank, precision) -> dict:
    tol = TOL[precision]
    out = per_rank[0]
    tau, (s0, s1, s2) = out["tau"], out["maxima"]
    worst = {"measured_vs_float64": 0.0, "unchanged_before_clip": 0.0, "after_clip": 0.0}
    clipped = 0
    for result in per_rank:  # each rank's float64 figure covers its own heads
        for layer, values in result["core"].items():
            first = result["first"][layer]
            for i, v in enumerate(values):
                worst["measured_vs_float64"] = max(worst["measured_vs_float64"], abs(s0[layer][first + i] - v) / abs(v))
    for layer in s0:
        for a, b, c in zip(s0[layer], s1[layer], s2[layer]):
            worst["unchanged_before_clip"] = max(worst["unchanged_before_clip"], abs(a - b) / abs(a))
            want = tau if b > tau else b
            clipped += b > tau
            worst["after_clip"] = max(worst["after_clip"], abs(c - want) / abs(want))
    ok = clipped > 0 and all(v <= tol for v in worst.values())
    return {"ok": ok, "tolerance": tol, "heads_clipped": clipped, "tau": tau, "worst": worst,
            "sources": out["sources"], "maxima": out["maxima"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", choices=["te", "local"], default="te")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    report = {"spec": args.spec, "backend": args.backend, "world": args.world, "cases": {}}
    if args.spec == "te":
        report["transformer_engine"] = te_version()
        if report["transformer_engine"] is None:
            print("Transformer Engine >= 2.9 is not importable: nothing checked", flush=True)
            return 3
    for precision in ("fp32", "bf16"):
        try:
            per_rank = run_world(check_worker, args.world, args.spec, precision, backend=args.backend)
            report["cases"][precision] = evaluate(per_rank, precision)
        except Exception as err:  # noqa: BLE001 - recorded and reported
            report["cases"][precision] = {"ok": False, "error": str(err)}
        print(precision, json.dumps({k: v for k, v in report["cases"][precision].items() if k != "maxima"}),
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "te_qk_clip.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0 if all(case["ok"] for case in report["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
