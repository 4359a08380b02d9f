"""The ZeRO-3, offload and BF16_Optimizer scenarios of ``_scenarios_zero3`` on GPUs (one rank per
GPU, NCCL), checked as ``test_deepspeed_zero3`` checks them on the CPU.

    python tests/deepspeed/zero3_nccl_check.py                   # 2 GPUs, NCCL
    python tests/deepspeed/zero3_nccl_check.py --backend gloo    # the same on the CPU (dry run)

On GPUs this is where optimizer offload does what it is for: momentum and fp32 masters in CPU
memory, Newton-Schulz on the GPU (``DistributedMuon.ns_device``), results copied back. The offload
runs are compared with the float32 reference within ``RTOL`` (not bitwise with the runs without
offload: there the element-wise steps run on the GPU, here on the CPU). Prints one line per check
and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

import torch  # noqa: E402

from _harness import NCCL_ENV, run_world  # noqa: E402
from test_deepspeed_zero3 import (  # noqa: E402
    BF16_FACTOR, MUON_MATRICES, RTOL, STEPS, _bf16_reference, _max_relative_error, _micro_batches, _reference,
    _relative_errors, _whole_batch,
)

SCENARIOS = ["zero3_whole_batch", "zero3_accumulation_subgroups", "zero3_zero_init", "zero3_offload", "offload_zero1",
             "offload_zero2", "bf16_optimizer_zero1", "bf16_zero3", "zero3_resume"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--timeout", type=float, default=540)
    args = parser.parse_args(argv)
    os.environ.update(NCCL_ENV)
    if args.backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as shared:
        os.environ["MUON_DS_SHARED_DIR"] = shared
        # place_inputs: batches on the rank's device, as on the GPUs (a dry run of that path under gloo)
        results = run_world(2, SCENARIOS, timeout=args.timeout, backend=args.backend, place_inputs=True, log=True)
    checks: list[tuple[str, bool, str]] = []

    def check(what: str, passed: bool, detail: str = "") -> None:
        checks.append((what, bool(passed), detail))

    def first(name):
        out = results[name][0]
        if "ok" not in out:
            check(name, False, out.get("traceback", out.get("error", "")))
            return None
        return out["ok"]

    want = _reference(2)
    for name in ("zero3_whole_batch", "zero3_accumulation_subgroups", "zero3_zero_init", "zero3_offload"):
        r = first(name)
        if r is not None:
            err = _max_relative_error(r["weights"], want)
            check(f"{name}: weights vs reference", err < RTOL, f"{err:.2e} ({r['wrapper']})")
            check(f"{name}: NS once per matrix and step", r["ns_matrices"] == STEPS * len(MUON_MATRICES),
                  str(r["ns_matrices"]))
            if name == "zero3_offload":
                check(f"{name}: momentum in CPU memory", r["muon_state_device"] == ["cpu"], str(r["muon_state_device"]))
    for name in ("offload_zero1", "offload_zero2"):
        r = first(name)
        if r is not None:
            for kind in ("plain", "offload"):
                err = _max_relative_error(r[kind]["weights"], want)
                check(f"{name} ({kind}): weights vs reference", err < RTOL, f"{err:.2e} ({r[kind]['wrapper']})")
            check(f"{name}: momentum in CPU memory with offload", r["offload"]["muon_state_device"] == ["cpu"],
                  f"{r['offload']['muon_state_device']} (without: {r['plain']['muon_state_device']})")
    for name, batches in (("bf16_optimizer_zero1", _micro_batches), ("bf16_zero3", _whole_batch)):
        r = first(name)
        if r is not None:
            engine, single = _relative_errors(r["masters"], want), _relative_errors(_bf16_reference(2, batches), want)
            worst, bound = max(engine[m] for m in MUON_MATRICES), BF16_FACTOR * max(single[m] for m in MUON_MATRICES)
            check(f"{name}: Muon matrices within bf16 rounding", worst <= bound,
                  f"{worst:.2e}, bound {bound:.2e} ({r['wrapper']})")
    r = results["zero3_resume"]
    if all("ok" in x for x in r):
        same = all(torch.equal(x["ok"]["straight"][n], x["ok"]["resumed"][n]) for x in r for n in x["ok"]["straight"])
        check("zero3_resume: bitwise", same)
    else:
        first("zero3_resume")
    for what, passed, detail in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {what}  {detail}")
    return 0 if all(p for _, p, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
