"""The Muon step over four Moonlight MoE layers (800 matrices, 2.34 B fp32 parameters), timed for
two trees of the package in one run, so a restructuring can be checked for a regression.

    python benchmarks/step_regression.py --trees BASELINE_DIR . --out DIR     # on the GPU
    python benchmarks/step_regression.py --trees BASELINE_DIR . --tiny --out DIR   # CPU smoke test

Each tree is imported in a subprocess of its own (``PYTHONPATH=TREE``), in the order given and then
again in that order (each version timed twice, METHOD.md), and times, on the same weights and
gradients: ``FusedMuon``'s runtime (``MuonStepRuntime``, backend chosen by measurement), the core
``Muon`` and ``DistributedMuon`` in one process (the engine adapters' path). Median of ``--reps``
steps after two warm-up steps. Writes DIR/step_regression.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LR, WD = 4.2e-4, 0.1


def worker(tiny: bool, reps: int) -> dict:
    import torch

    sys.path.insert(0, HERE)
    from moonlight_shapes import moe_layer_shapes

    import muon_megatron
    from muon_megatron.distributed import DistributedMuon, ParamLayout
    from muon_megatron.kernels import BackendChooser, MuonStepRuntime, time_call

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = []
    for _ in range(4):
        for _, shape, count in moe_layer_shapes():
            n = min(count, 4) if tiny else count
            shapes += [tuple(max(4, s // 32) for s in shape) if tiny else shape] * n
    gen = torch.Generator(device=dev).manual_seed(0)
    W0 = [torch.randn(s, device=dev, generator=gen).mul_(0.02) for s in shapes]
    G = [torch.randn(s, device=dev, generator=gen) for s in shapes]
    out = {"package": os.path.dirname(muon_megatron.__file__), "matrices": len(shapes),
           "params": sum(w.numel() for w in W0), "device": str(dev), "ms": {}}

    def timed(name, make, step):
        W = [torch.nn.Parameter(w.clone()) for w in W0]
        opt = make(W)
        for _ in range(2):
            step(opt, W)
        out["ms"][name] = 1e3 * time_call(lambda: step(opt, W), warmup=0, reps=reps)
        opt = W = None  # free before the next optimizer is built
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def with_grads(opt, W):
        for w, g in zip(W, G):
            w.grad = g
        opt.step()

    chooser = BackendChooser()
    timed("MuonStepRuntime (FusedMuon), auto backend", lambda W: MuonStepRuntime(W, backend=chooser),
          lambda opt, W: opt.step_(G, lr=LR, weight_decay=WD))
    timed("core Muon", lambda W: muon_megatron.Muon(W, lr=LR, weight_decay=WD), with_grads)
    timed("DistributedMuon, one process", lambda W: DistributedMuon(
        [{"params": W, "layouts": [ParamLayout(f"w{i}", tuple(w.shape)) for i, w in enumerate(W)]}],
        lr=LR, weight_decay=WD), with_grads)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", default=[], help="package trees to compare (each holds muon_megatron/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.tiny, args.reps)))
        return 0
    if not args.trees:
        parser.error("--trees: give at least one package tree")
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for tree in args.trees * 2:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--reps", str(args.reps), "--out", args.out]
        if args.tiny:
            cmd.append("--tiny")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.abspath(tree))
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run["tree"] = tree
        runs.append(run)
        print(f"{tree}: {run['ms']}", flush=True)
    with open(os.path.join(args.out, "step_regression.json"), "w") as f:
        json.dump(runs, f, indent=1)
    names = list(runs[0]["ms"])
    print(f"\n{runs[0]['matrices']} matrices, {runs[0]['params'] / 1e9:.2f} B params, {runs[0]['device']}; "
          "median ms per step (each tree timed twice)\n")
    print("| step | " + " | ".join(args.trees) + " |")
    print("| --- |" + " --- |" * len(args.trees))
    for name in names:
        cells = []
        for tree in args.trees:
            times = [r["ms"][name] for r in runs if r["tree"] == tree]
            cells.append(" / ".join(f"{t:.1f}" for t in times))
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
