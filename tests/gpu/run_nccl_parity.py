"""The suite's parity scenarios with one rank per GPU on NCCL, against float64 single-process references.

    python tests/gpu/run_nccl_parity.py --out DIR                  # NCCL, two GPUs
    python tests/gpu/run_nccl_parity.py --backend gloo --out DIR   # the same cases on the CPU (gloo, CPU shim)

Writes ``DIR/nccl_parity.json`` and ``DIR/nccl_parity.md`` (rewritten after every phase, so a run cut
short still leaves what it finished) and exits 0 when every case passes. The workers are the CPU
suite's (``tests/megatron/mcore_parity.py``, ``tests/deepspeed/_scenarios.py``), started through
their harnesses with ``backend="nccl"``: ``torch.cuda.set_device(rank)``, an NCCL process group, no
CPU shim. The gloo mode runs the same cases and the same input-placement code on the CPU, as a dry
run of the GPU command. NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set for this process and every rank it starts.

References. Megatron: ``mcore_gpu_workers.reference64`` (the tiny GPT of ``mcore_models`` in
float64 on one CPU process, ``muon_megatron.Muon`` with Newton-Schulz in float64, the full global
batch, clipping at 1.0), 3 steps. DeepSpeed: ``TinyLM`` of ``tests/deepspeed/_model.py`` in float64
(its float32 cast of the logits suspended), ``Muon`` in float64 on the mean gradient of both ranks'
micro-batches, clipping at 1.0, 4 steps. The parallel runs keep float32 weights.

Metric and tolerance per engine, as the CPU suite measures them:
- Megatron: relative Frobenius error per tensor (each rank's shard against the same shard of the
  reference), maximum over tensors and ranks; tolerance ``TOL`` of
  ``tests/megatron/test_megatron_parity.py`` (1e-4).
- DeepSpeed: ``max |w - w_ref| / max |w_ref|`` per tensor, maximum over tensors and ranks; tolerance
  ``RTOL`` of ``tests/deepspeed/test_deepspeed_engine.py`` (1e-5).
- DeepSpeed MoE (experts differ per rank, so no single-process model exists): the first update of
  each expert against ``lr * 0.2 sqrt(max(A, B)) * NS_float64(g)`` of its own gradient, relative
  Frobenius; tolerance 1e-4 (float32 Newton-Schulz is ~1e-6 off float64; the update is read as
  W0 - W1 in float32, where |W| / |dW| is about 100 (experts drawn with std 0.2, update RMS
  lr * 0.2 = 2e-3), so ~6e-6 of cancellation).

bf16 Newton-Schulz: rounding bound. bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3);
Moonlight's five Newton-Schulz steps (a = 3.4445 each) amplify it: on a full-rank 48 x 32 matrix the
bf16 result is ~6e-2 (relative Frobenius) off the float64 one, and on a rank-deficient gradient (these
models see 32 tokens a step) the rounding noise in the null space is lifted into the singular-value
band, an O(1) difference there. That rounding is not reproduced bit for bit by a parallel run
(matrices are batched per owner, gradients summed in another order), so the parallel run's distance
from the float64 reference is another draw of the same size as that of the single-process run with
bf16 Newton-Schulz (``mcore_parity.reference_worker`` / ``_model.reference_weights`` with
``ns_dtype=bfloat16``, computed in this run). Bound: ``BF16_FACTOR`` (3) times that single-process
error, never below the float32 tolerance. The JSON records both numbers.

One control case runs TP 2 with the fused QKV and gate|up weights orthogonalised whole instead of as
Moonlight's separate matrices: it must miss the float32 tolerance by ``CONTROL_FACTOR`` (100), which
shows that the metric, on this backend, sees a wrong update.

Each case also carries structural checks that make it mean what its name says (a matrix really cut
between ranks, sequence parallelism really on, no Muon element crossing ranks in the aligned
layout, ...); a case passes when its error is under tolerance and every check holds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
for _path in (os.path.join(TESTS, "deepspeed"), os.path.join(TESTS, "megatron"), HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NCCL_ENV)

import torch  # noqa: E402

BF16_FACTOR = 3.0
#: The control case (fused QKV and gate|up orthogonalised whole, not as Moonlight's separate matrices)
#: must miss the float32 tolerance by this factor, as ``test_tolerance_detects_a_wrong_split`` asks.
CONTROL_FACTOR = 100.0
MOE_UPDATE_TOL = 1e-4
JSON_NAME, MD_NAME = "nccl_parity.json", "nccl_parity.md"
ENGINES = ("megatron", "deepspeed")


# ---- bookkeeping -------------------------------------------------------------------------------------


class Report:
    """Cases and run metadata; :meth:`write` renders both files (called after every phase)."""

    def __init__(self, out: str, backend: str):
        self.out, self.backend = out, backend
        self.cases: list[dict] = []
        self.phases: list[dict] = []
        self.meta = {
            "backend": backend,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "packages": _versions("megatron-core", "deepspeed", "pydantic", "emerging-optimizers"),
            "git_commit": _git_commit(),
            "env": {k: os.environ.get(k) for k in (*NCCL_ENV, "NVIDIA_TF32_OVERRIDE", "CUDA_VISIBLE_DEVICES")},
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "bf16_factor": BF16_FACTOR,
        }

    def add(self, name, engine, world, ns_dtype, metric, error, tol, checks=None, failure=None, control=False,
            **details):
        """One case; it passes when ``error < tol`` and every check holds, or for a ``control`` (a
        deliberately wrong run showing the metric's sensitivity) when ``error > tol``."""
        checks = checks or {}
        within = error is not None and (error > tol if control else error < tol)
        passed = failure is None and within and all(checks.values())
        self.cases.append(dict(
            name=name, engine=engine, world=world, backend=self.backend, ns_dtype=ns_dtype, metric=metric,
            max_rel_error=error, tolerance=tol, control=control, passed=passed, checks=checks, failure=failure,
            **details,
        ))
        status = "PASS" if passed else "FAIL"
        shown = "-" if error is None else f"{error:.3e}"
        print(f"[{status}] {name}: {shown} ({'must exceed' if control else 'tol'} {tol:.1e})"
              f"{'' if all(checks.values()) else f' checks {checks}'}"
              f"{'' if failure is None else ' -- ' + failure.strip().splitlines()[-1]}", flush=True)

    def write(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        doc = {"meta": self.meta, "phases": self.phases, "cases": self.cases,
               "all_passed": bool(self.cases) and all(c["passed"] for c in self.cases)}
        with open(os.path.join(self.out, JSON_NAME), "w") as f:
            json.dump(doc, f, indent=1, default=str)
        with open(os.path.join(self.out, MD_NAME), "w") as f:
            f.write(render_markdown(doc))


def render_markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = [
        f"# Parity on {meta['backend']}: parallel runs against float64 single-process references",
        "",
        f"torch {meta['torch']}, " + ", ".join(f"{k} {v}" for k, v in meta["packages"].items() if v)
        + f"; devices: {meta.get('devices', 'n/a')}; commit {meta.get('git_commit') or 'n/a'}; {meta['started']}.",
        "",
        "| case | engine | world | backend | NS dtype | max rel. error | tolerance | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in doc["cases"]:
        err = "-" if c["max_rel_error"] is None else f"{c['max_rel_error']:.2e}"
        tol = f"> {c['tolerance']:.1e} (control)" if c.get("control") else f"{c['tolerance']:.1e}"
        lines.append(f"| {c['name']} | {c['engine']} | {c['world']} | {c['backend']} | {c['ns_dtype']} | {err} | "
                     f"{tol} | {'pass' if c['passed'] else 'FAIL'} |")
    lines += ["", "Metrics: " + "; ".join(sorted({f"{c['engine']}: {c['metric']}" for c in doc["cases"]})) + ".", ""]
    bf16 = [c for c in doc["cases"] if c["ns_dtype"] == "bfloat16"]
    if bf16:
        lines.append(f"bf16 Newton-Schulz bound: {meta['bf16_factor']:g} x the single-process bf16-NS run's error "
                     "against the float64 reference, at least the float32 tolerance:")
        lines += [f"- {c['name']}: single-process bf16 error {c.get('single_process_bf16_error', float('nan')):.2e}"
                  for c in bf16]
        lines.append("")
    lines.append("Structural checks:")
    for c in doc["cases"]:
        if c["checks"]:
            lines.append(f"- {c['name']}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in c["checks"].items()))
    failed = [c for c in doc["cases"] if c["failure"]]
    if failed:
        lines += ["", "Failures (last line; the JSON has the traceback):"]
        lines += [f"- {c['name']}: {c['failure'].strip().splitlines()[-1]}" for c in failed]
    lines += ["", "Phases: " + ", ".join(f"{p['name']} {p['seconds']:.0f} s" + ("" if p["ok"] else " (failed)")
                                         for p in doc["phases"]), ""]
    return "\n".join(lines)


def _versions(*names):
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git_commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def phase(report: Report, name: str):
    """Time a phase; an exception is recorded (and printed) instead of ending the run."""
    start, record = time.monotonic(), {"name": name, "ok": True}
    print(f"== {name}", flush=True)
    try:
        yield record
    except Exception:  # noqa: BLE001 - recorded; the cases of the phase report it
        record["ok"], record["error"] = False, traceback.format_exc()
        print(record["error"], flush=True)
    record["seconds"] = time.monotonic() - start
    report.phases.append(record)
    report.write()


def world_timeout(backend: str, world: int) -> float:
    """Seconds a world may take (a hung world must leave time for the rest of a 10-minute run on the
    GPUs; the CPU of a dry run is slower)."""
    return (120 + 90 * world) * (1 if backend == "nccl" else 3)


@contextlib.contextmanager
def cpu_only():
    """Spawned processes see no GPU (the references run on the CPU, as in the CPU suite)."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


# ---- Megatron --------------------------------------------------------------------------------------


def megatron_relative_error(per_rank) -> float:
    return max(max(errors.values()) for errors, _, _ in per_rank)


def run_megatron(report: Report, backend: str, work: str) -> None:
    import mcore_gpu_workers as gw
    import mcore_parity as mp
    import test_megatron_parity as suite
    from mcore_harness import run_world

    tol, steps = suite.TOL, suite.STEPS
    specs = {"dense": suite.DENSE, "dense3": suite.DENSE3, "moe": suite.MOE_MLA}
    ref64 = {n: os.path.join(work, f"mcore_ref64_{n}.pt") for n in specs}
    ref_bf16 = {n: os.path.join(work, f"mcore_ref_nsbf16_{n}.pt") for n in ("dense", "dense3")}
    ckpt_dp1, ckpt_dp2 = os.path.join(work, "mcore_ckpt_dp1"), os.path.join(work, "mcore_ckpt_dp2")
    metric = "relative Frobenius error per tensor shard, max over tensors and ranks"

    with phase(report, "megatron references (CPU, float64 and bf16-NS)") as rec, cpu_only():
        run_world(gw.reference64_worker, 1, [(specs[n], steps, ref64[n]) for n in specs], timeout=400)
        run_world(gw.reference_bf16_worker, 1, [(specs[n], steps, ref_bf16[n]) for n in ref_bf16], timeout=400)
    if not rec["ok"]:
        report.add("megatron/references", "megatron", 1, "float64", metric, None, tol, failure=rec["error"])
        return
    bf16_error = {n: _state_error(ref_bf16[n], ref64[n]) for n in ref_bf16}

    def job(name, spec_name, layout, settings=None, bucket=1000, start=0, stop=steps, save=None, load=None,
            worker=mp.parallel_worker):
        args = (specs[spec_name], stop, ref64[spec_name], layout, settings, bucket, start, save, load)
        return name, worker, args

    one_bucket = 10**6
    world1_first = [job("save_dp1", "dense", dict(distopt=True), stop=2, save=ckpt_dp1)]
    world2 = [
        job("tp2_gqa", "dense", dict(tp=2)),
        job("tp2_sequence_parallel", "dense", dict(tp=2), worker=gw.sequence_parallel_worker),
        job("dp2_distopt_gather", "dense3", dict(distopt=True), dict(layout="gather")),
        job("dp2_distopt_aligned", "dense3", dict(distopt=True, aligned=True), dict(layout="aligned"), one_bucket),
        job("moe_ep2", "moe", dict(ep=2, distopt=True)),
        job("save_dp2", "dense", dict(distopt=True), stop=2, save=ckpt_dp2),
        job("resume_dp1_ckpt_at_dp2", "dense", dict(distopt=True), start=2, load=ckpt_dp1),
        job("tp2_gqa_ns_bf16", "dense", dict(tp=2), dict(ns_dtype="bfloat16")),
        job("dp2_distopt_gather_ns_bf16", "dense3", dict(distopt=True), dict(layout="gather", ns_dtype="bfloat16")),
        job("tp2_fused_qkv_fc1_control", "dense", dict(tp=2), dict(split_qkv=False, split_fc1=False)),
    ]
    world1_last = [job("resume_dp2_ckpt_at_dp1", "dense", dict(distopt=True), start=2, load=ckpt_dp2)]
    results: dict[str, tuple] = {}
    for world, jobs in ((1, world1_first), (2, world2), (1, world1_last)):
        with phase(report, f"megatron world {world}: " + ", ".join(n for n, _, _ in jobs)) as rec:
            per_rank = run_world(gw.run_cases_logged, world, jobs, timeout=world_timeout(backend, world),
                                 backend=backend, place_inputs=True)
        for name, _, _ in jobs:
            if not rec["ok"]:
                results[name] = ("error", rec["error"], world)
                continue
            bad = [value for status, value in (r[name] for r in per_rank) if status != "ok"]
            results[name] = ("error", bad[0], world) if bad else ("ok", [r[name][1] for r in per_rank], world)

    def add(name, label, ns_dtype="float32", checks_of=None, saved_by=None, bf16_ref=None, control=False):
        status, value, world = results[name]
        failure = None if status == "ok" else value
        if saved_by and results[saved_by][0] != "ok":
            failure = f"the checkpoint's writer, case {saved_by}, failed:\n{results[saved_by][1]}"
        error = megatron_relative_error(value) if failure is None else None
        checks = checks_of(value) if (checks_of and failure is None) else {}
        details = {}
        case_tol = CONTROL_FACTOR * tol if control else tol
        if bf16_ref:
            details["single_process_bf16_error"] = bf16_error[bf16_ref]
            case_tol = max(tol, BF16_FACTOR * bf16_error[bf16_ref])
        if failure is None:
            details["plans"] = [plan for _, _, plan in value]
        report.add(f"megatron/{label}", "megatron", world, ns_dtype, metric, error, case_tol, checks, failure,
                   control, **details)

    def plans(value):
        return [plan for _, _, plan in value]

    def experts_by_rank(value):
        found = [sorted({int(m.group(1)) for n in errors if (m := re.search(r"local_experts\.(\d+)\.", n))})
                 for errors, _, _ in value]
        return found

    add("tp2_gqa", "tp2_gqa", checks_of=lambda v: {
        "GQA (4 heads, 2 query groups)": suite.DENSE.num_query_groups < suite.DENSE.num_attention_heads,
        f"{suite.DENSE_MATRICES} logical matrices (q/k/v, gate/up split)":
            all(p["matrices"] == suite.DENSE_MATRICES for p in plans(v)),
        "matrices assembled from TP pieces": all(max(p["sources"]) >= 2 for p in plans(v)),
    })
    add("tp2_sequence_parallel", "tp2_sequence_parallel", checks_of=lambda v: {
        "sequence_parallel on": all(p.get("sequence_parallel") for p in plans(v)),
        "norm weights marked sequence-parallel": all(p.get("marked_norms", 0) > 0 for p in plans(v)),
    })
    add("dp2_distopt_gather", "dp2_distopt_gather", checks_of=lambda v: {
        "matrices cut between DP ranks (elements gathered)": sum(p["gather_elems"] for p in plans(v)) > 0,
    })
    add("dp2_distopt_aligned", "dp2_distopt_aligned", checks_of=lambda v: {
        "no Muon element crosses DP ranks": sum(p["gather_elems"] for p in plans(v)) == 0,
        "both ranks own matrices": all(p["owned"] > 0 for p in plans(v)),
    })
    add("moe_ep2", "moe_ep2", checks_of=lambda v: {
        "experts 0-1 on EP rank 0, 2-3 on EP rank 1": experts_by_rank(v) == [[0, 1], [2, 3]],
    })
    add("resume_dp1_ckpt_at_dp2", "torch_dist_save_dp1_resume_dp2", saved_by="save_dp1")
    add("resume_dp2_ckpt_at_dp1", "torch_dist_save_dp2_resume_dp1", saved_by="save_dp2")
    add("tp2_gqa_ns_bf16", "tp2_gqa_ns_bf16", "bfloat16", bf16_ref="dense")
    add("dp2_distopt_gather_ns_bf16", "dp2_distopt_gather_ns_bf16", "bfloat16", bf16_ref="dense3")
    add("tp2_fused_qkv_fc1_control", "tp2_control_qkv_fc1_unsplit", control=True)
    report.write()


def _state_error(path: str, ref_path: str) -> float:
    """Max relative Frobenius error of one reference file's final weights against another's."""
    got = torch.load(path, map_location="cpu")["final"]
    want = torch.load(ref_path, map_location="cpu")["final"]
    return max(float((got[n].double() - want[n]).norm() / want[n].norm().clamp_min(1e-12)) for n in want)


# ---- DeepSpeed -------------------------------------------------------------------------------------


class _KeepFloat64(torch.overrides.TorchFunctionMode):
    """``Tensor.float()`` leaves float64 tensors as they are (TinyLM casts its logits to float32)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        return func(*args, **(kwargs or {}))


def ds_reference(steps: int, world: int, gas: int, clip: float, lr: float, wd: float, ns_dtype: torch.dtype,
                 float64: bool) -> dict:
    """Single-process Muon on TinyLM over the mean gradient of ``world`` ranks x ``gas`` micro-batches;
    with ``float64`` the whole model, its loss and Newton-Schulz in float64."""
    from _model import make_model, micro_batch, reference_weights

    from muon_megatron import Muon, muon_param_groups

    if not float64:
        return reference_weights(steps, world, gas, clip=clip, opt_kwargs=dict(lr=lr, weight_decay=wd,
                                                                                ns_dtype=ns_dtype))
    model = make_model(0).double()
    opt = Muon(muon_param_groups(model), lr=lr, weight_decay=wd, ns_dtype=torch.float64)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        with _KeepFloat64():
            losses = [model(*micro_batch(step, m, r)) for r in range(world) for m in range(gas)]
            loss = torch.stack(losses).mean()
        if loss.dtype != torch.float64:
            raise AssertionError(f"the float64 reference computed its loss in {loss.dtype}")
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def ds_relative_error(got: dict, want: dict) -> float:
    """``tests/deepspeed/test_deepspeed_engine._max_relative_error``, in float64."""
    return max(((got[n].double() - want[n].double()).abs().max() / want[n].double().abs().max()).item() for n in want)


def run_deepspeed(report: Report, backend: str, work: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cuda" if backend == "nccl" else "cpu"  # before deepspeed is imported
    import test_deepspeed_engine as suite
    from _harness import run_world

    tol, steps, kw = suite.RTOL, suite.STEPS, suite.OPT_KW
    metric = "max |w - w_ref| / max |w_ref| per tensor, max over tensors and ranks"
    with phase(report, "deepspeed references (CPU, float64 and bf16-NS)") as rec:
        ref64 = ds_reference(steps, 2, 1, 1.0, kw["lr"], kw["weight_decay"], torch.float64, float64=True)
        ref_bf16 = ds_reference(steps, 2, 1, 1.0, kw["lr"], kw["weight_decay"], torch.bfloat16, float64=False)
        bf16_error = ds_relative_error(ref_bf16, ref64)
    if not rec["ok"]:
        report.add("deepspeed/references", "deepspeed", 1, "float64", metric, None, tol, failure=rec["error"])
        return

    os.environ["MUON_DS_SHARED_DIR"] = os.path.join(work, "ds_universal")
    os.makedirs(os.environ["MUON_DS_SHARED_DIR"], exist_ok=True)
    phases = (
        (1, ["universal_checkpoint_dp1_to_dp2"]),
        (2, ["parity_zero1", "parity_zero2", "parity_zero1_ns_bf16", "parity_zero2_ns_bf16",
             "moe_expert_first_update_vs_float64_ns", "universal_checkpoint_dp2_to_dp1",
             "universal_checkpoint_load_at_dp2"]),
        (1, ["universal_checkpoint_load_at_dp1"]),
    )
    results: dict[str, tuple] = {}
    for world, names in phases:
        with phase(report, f"deepspeed world {world}: " + ", ".join(names)) as rec:
            out = run_world(world, names, timeout=world_timeout(backend, world), backend=backend, place_inputs=True,
                            log=True)
        for name in names:
            if not rec["ok"]:
                results[name] = ("error", rec["error"], world)
                continue
            bad = [r.get("traceback", r.get("error")) for r in out[name] if "ok" not in r]
            results[name] = ("error", bad[0], world) if bad else ("ok", [r["ok"] for r in out[name]], world)

    def add(name, label, ns_dtype="float32", measure=None, checks_of=None, needs=(), bf16=False, case_metric=metric,
            case_tol=tol):
        status, value, world = results[name]
        failure = None if status == "ok" else value
        for other in needs:
            if results[other][0] != "ok":
                failure = f"case {other}, which this one needs, failed:\n{results[other][1]}"
        error = measure(value) if failure is None else None
        checks = checks_of(value) if (checks_of and failure is None) else {}
        details = {}
        if failure is None and "holders" in value[0]:
            details["holders"] = value[0]["holders"]
        if bf16:
            details["single_process_bf16_error"] = bf16_error
            case_tol = max(case_tol, BF16_FACTOR * bf16_error)
        report.add(f"deepspeed/{label}", "deepspeed", world, ns_dtype, case_metric, error, case_tol, checks, failure,
                   **details)

    def parity(value):
        return max(ds_relative_error(r["weights"], ref64) for r in value)

    def straddles(value):
        holders = value[0]["holders"]
        return {"fc2.weight straddles the DP partition (held by ranks 0 and 1)": holders.get("fc2.weight") == [0, 1],
                "each Muon matrix orthogonalised once per step":
                    value[0]["ns_matrices"] == steps * len(suite.MUON_MATRICES)}

    add("parity_zero1", "zero1_dp2", measure=parity, checks_of=straddles)
    add("parity_zero2", "zero2_dp2", measure=parity, checks_of=straddles)
    add("parity_zero1_ns_bf16", "zero1_dp2_ns_bf16", "bfloat16", measure=parity, bf16=True)
    add("parity_zero2_ns_bf16", "zero2_dp2_ns_bf16", "bfloat16", measure=parity, bf16=True)
    add("moe_expert_first_update_vs_float64_ns", "moe_ep2_expert_first_update",
        measure=lambda v: max(max(r["errors"].values()) for r in v),
        checks_of=lambda v: {"2 local experts x (up, down) per rank, each its own matrix":
                             all(len(r["errors"]) == 4 for r in v)},
        case_metric="first update of each expert vs lr * 0.2 sqrt(max(A, B)) * NS_float64(its gradient), "
                    "relative Frobenius, max over experts and ranks",
        case_tol=MOE_UPDATE_TOL)
    def same_as_straight(value):
        straight = results["universal_checkpoint_dp2_to_dp1"][1][0]["straight"]
        return {"resumed DP1 run equals the uninterrupted DP2 run (within tolerance)":
                ds_relative_error(value[0]["resumed"], straight) < tol}

    add("universal_checkpoint_load_at_dp1", "universal_save_dp2_resume_dp1",
        measure=lambda v: ds_relative_error(v[0]["resumed"], ref64), checks_of=same_as_straight,
        needs=("universal_checkpoint_dp2_to_dp1",))
    add("universal_checkpoint_load_at_dp2", "universal_save_dp1_resume_dp2",
        measure=lambda v: max(ds_relative_error(r["resumed"], ref64) for r in v),
        needs=("universal_checkpoint_dp1_to_dp2",))
    report.write()


# ---- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for nccl_parity.json and nccl_parity.md")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl",
                        help="nccl: one rank per GPU (needs 2 GPUs); gloo: the same cases on the CPU with the CPU shim")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="which engines to run")
    parser.add_argument("--workdir", help="folder for references and checkpoints (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        parser.error(f"--backend nccl needs 2 GPUs, {torch.cuda.device_count()} visible; use --backend gloo on a CPU")

    report = Report(args.out, args.backend)
    with contextlib.ExitStack() as stack:
        work = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="nccl_parity_"))
        os.makedirs(work, exist_ok=True)
        if "megatron" in args.engines:
            run_megatron(report, args.backend, work)
        if "deepspeed" in args.engines:
            run_deepspeed(report, args.backend, work)
    if args.backend == "nccl":
        report.meta["devices"] = ", ".join(torch.cuda.get_device_name(i) for i in range(2))
        report.meta["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        report.meta["devices"] = f"CPU ({platform.processor() or platform.machine()})"
    report.write()
    passed = sum(c["passed"] for c in report.cases)
    print(f"{passed} of {len(report.cases)} cases passed; results in {args.out}", flush=True)
    return 0 if report.cases and passed == len(report.cases) else 1


if __name__ == "__main__":
    sys.exit(main())
