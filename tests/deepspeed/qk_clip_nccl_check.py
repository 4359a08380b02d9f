"""The QK-Clip scenarios of ``_scenarios_qk_clip`` on GPUs (one rank per GPU, NCCL), checked by the
same functions ``test_deepspeed_qk_clip`` uses on the CPU.

    python tests/deepspeed/qk_clip_nccl_check.py                   # 2 GPUs, NCCL
    python tests/deepspeed/qk_clip_nccl_check.py --backend gloo    # the same on the CPU (dry run)

On GPUs the max logits are recorded on the device, the MAX all-reduce runs over NCCL, and the
factors are applied to partitions on the GPU (and, with optimizer offload, to fp32 masters in CPU
memory). Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from _harness import NCCL_ENV, ok, run_world  # noqa: E402

SCENARIOS = ["qk_clip_gqa_zero1", "qk_clip_mla_zero1", "qk_clip_gqa_zero2_offload", "qk_clip_gqa_zero3",
             "qk_clip_bf16_masters_zero1", "qk_clip_bf16_optimizer_zero1", "qk_clip_off_is_unchanged",
             "qk_clip_resume"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--timeout", type=float, default=540)
    args = parser.parse_args(argv)
    os.environ.update(NCCL_ENV)
    if args.backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import test_deepspeed_qk_clip as t  # after DS_ACCELERATOR is set

    world = (2, run_world(2, SCENARIOS, timeout=args.timeout, backend=args.backend, log=True))
    checks = []

    def check(what, fn, *fn_args):
        try:
            fn(world, *fn_args)
            checks.append((what, True, ""))
        except Exception as err:  # noqa: BLE001 - every check reports
            checks.append((what, False, f"{type(err).__name__}: {err}"))

    for name in SCENARIOS:
        try:
            ok(world[1], name)
        except AssertionError as err:
            checks.append((f"{name} ran", False, str(err)))
    for name in ("qk_clip_gqa_zero1", "qk_clip_mla_zero1", "qk_clip_gqa_zero2_offload", "qk_clip_gqa_zero3"):
        check(f"{name}: max logits vs float64",
              t.test_recorded_max_logits_are_the_float64_max_over_ranks_and_micro_batches, name)
        check(f"{name}: clipped heads land on tau", t.test_clipped_heads_land_on_tau_and_the_rest_is_untouched, name)
        check(f"{name}: weights vs Muon-then-clip reference",
              t.test_weights_equal_the_single_process_muon_then_clip_reference, name)
    check("ZeRO-1 boundary inside a query weight", t.test_zero1_partition_boundary_cuts_a_declared_query_weight_mid_row)
    check("telemetry in DeepSpeed's CSV monitor", t.test_telemetry_reaches_deepspeeds_monitor)
    check("off / unreached: bitwise unchanged", t.test_qk_clip_off_or_never_reached_leaves_training_bitwise_unchanged)
    check("resume: bitwise", t.test_resume_with_qk_clip_gives_the_same_weights_as_training_straight_through)
    bf16 = t.test_bf16_weights_are_the_clipped_fp32_masters_rounded
    check("bf16 ZeRO-1: weights are the clipped masters rounded", bf16, "qk_clip_bf16_masters_zero1", "ZeRO-1")
    check("BF16_Optimizer: weights are the clipped masters rounded", bf16, "qk_clip_bf16_optimizer_zero1",
          "ZeRO-1 BF16_Optimizer")
    for what, passed, detail in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {what}  {detail}")
    return 0 if all(p for _, p, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
