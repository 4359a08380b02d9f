"""Plan balance and traffic of Distributed Muon for Moonlight-16B-A3B (pure planning, no processes).

For DP = 8, 64, 512 and three buffer layouts -- DeepSpeed-style flat ZeRO-1, Megatron-style
buckets (every matrix may be cut over several ranks), and the matrix-aligned order (each matrix
whole in one partition) -- prints: NS TFLOP per step (total, max and mean rank), max/mean imbalance,
the bytes each rank sends per step for Muon's gather + return (bf16), and that traffic against
distributed AdamW's reduce-scatter + all-gather (bf16 grads and params, ring: each rank sends
(dp - 1) / dp of the model twice).

    python benchmarks/distributed_plan.py [--dp 8 64 512] [--markdown]
"""

from __future__ import annotations

import argparse
import time

from muon_megatron.distributed import (
    AlignItem,
    ParamSpec,
    aligned_layout,
    bucketed_layouts,
    flat_layouts,
    holdings,
    make_plan,
)
from muon_megatron import ExpertStack, Whole
from muon_megatron.models import MOONLIGHT_16B_A3B, get_model, weights


def param_specs(model):
    """The model's parameters, with each routed expert a parameter of its own (as Transformer
    Engine's grouped experts and DeepSpeed's expert modules hold them)."""
    out = []
    for w in weights(model):
        if w.use_muon and isinstance(w.split, ExpertStack):
            inner = w.split.inner
            for e in range(w.shape[0]):
                out.append(ParamSpec(f"{w.name}.weight{e}", w.shape[1:], inner or Whole(), True))
        else:
            out.append(ParamSpec(w.name, w.shape, w.split if w.use_muon else None, w.use_muon))
    return out


def aligned_per_rank(specs, dp):
    muon = [s for s in specs if s.use_muon]  # AdamW parameters keep their own, flatly sharded bucket
    items = [AlignItem.of(s.key, s.shape, s.split) for s in muon]
    layout = aligned_layout(items, dp)
    return layout.layouts(muon), sum(layout.padding) / (layout.partition_size * dp)


def run(model_name: str, dps, markdown: bool):
    model = get_model(model_name) if model_name else MOONLIGHT_16B_A3B
    specs = param_specs(model)
    total = sum(s.numel for s in specs)
    header = ("layout", "owners", "dp", "matrices", "NS TFLOP", "max rank", "mean rank", "max/mean",
              "Muon MB/rank (max)", "AdamW MB/rank", "(AdamW+Muon)/AdamW", "plan s", "padding")
    rows = []
    for dp in dps:
        for name, owners in (("flat", "holders"), ("flat", "any"), ("bucketed", "holders"), ("bucketed", "any"),
                             ("aligned", "holders")):
            padding = 0.0
            if name == "flat":
                per_rank = flat_layouts(specs, dp)
            elif name == "bucketed":
                per_rank = bucketed_layouts(specs, dp)
            else:
                per_rank, padding = aligned_per_rank(specs, dp)
            t0 = time.perf_counter()
            hs = [h for r, ls in enumerate(per_rank) for slot, lay in enumerate(ls) for h in holdings(lay, r, slot)]
            plan = make_plan(hs, dp, owners=owners)
            seconds = time.perf_counter() - t0
            muon_bytes = max(plan.send_bytes(2))
            adamw_bytes = 2 * 2 * total * (dp - 1) / dp
            mean = sum(plan.flops) / dp
            rows.append((name, owners, dp, len(plan.matrices), f"{sum(plan.flops) / 1e12:.1f}",
                         f"{max(plan.flops) / 1e12:.3f}", f"{mean / 1e12:.3f}", f"{plan.imbalance:.3f}",
                         f"{muon_bytes / 1e6:.1f}", f"{adamw_bytes / 1e6:.1f}",
                         f"{(adamw_bytes + muon_bytes) / adamw_bytes:.3f}", f"{seconds:.1f}", f"{padding:.2%}"))
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    if markdown:
        print()
        print(f"Model {model.name}: {total / 1e9:.2f} B parameters, {len(plan.matrices)} Muon matrices")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="moonlight-16b-a3b")
    parser.add_argument("--dp", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    run(args.model, args.dp, args.markdown)


if __name__ == "__main__":
    main()
