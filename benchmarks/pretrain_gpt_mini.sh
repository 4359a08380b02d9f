#!/usr/bin/env bash
# examples/mini through Megatron-LM's own pretrain_gpt.py on one GPU: Muon and AdamW side by side.
#
#   bash benchmarks/pretrain_gpt_mini.sh OUT_DIR
#
# Runs examples/mini/launch_torchrun.sh (python -m muon_megatron.megatron.launch pretrain_gpt.py) twice
# with mock data, ITERS iterations each (default 100): once as the example is (--optimizer muon), once
# with --optimizer adam; everything else equal (lr 2e-3 with ITERS/10 warm-up iterations, cosine to
# 2e-4 at ITERS, weight decay 0.1, bf16, distributed optimizer, same seed). Megatron logs every
# iteration (--log-interval 1) with its timers (--timing-log-level 1). Writes
#   OUT_DIR/{muon,adam}/args.txt   the arguments given to pretrain_gpt.py
#   OUT_DIR/{muon,adam}/log.txt    Megatron's output
#   OUT_DIR/summary.json, summary.md   lm loss and iteration / optimizer-step times, side by side
#
# Environment:
#   MEGATRON_LM      Megatron-LM files with pretrain_gpt.py (default: the repository's .megatron-lm/)
#   TRANSFORMER_IMPL local (default: no Transformer Engine), transformer_engine or auto
#   ITERS            iterations per run (default 100)
#   WHEELS           folder of wheels installed when megatron.training is missing (default .whl/)
#   DRY_RUN=1        write args.txt only (no GPU needed); SUMMARY_ONLY=1 summarises existing logs
#   EXTRA_ARGS       more flags for both runs
set -euo pipefail
out=${1:?usage: bash benchmarks/pretrain_gpt_mini.sh OUT_DIR}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
ITERS=${ITERS:-100}
export MEGATRON_LM=${MEGATRON_LM:-$root/.megatron-lm}
export TRANSFORMER_IMPL=${TRANSFORMER_IMPL:-local}
mkdir -p "$out"

summarize() {
    "$PYTHON" - "$out" "$ITERS" <<'EOF'
import json, re, statistics, sys
from pathlib import Path

out, iters = Path(sys.argv[1]), int(sys.argv[2])
ITER = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*elapsed time per iteration \(ms\): ([\d.]+) \|"
                  r".*lm loss: ([\d.Ee+-]+) \|")
TIMER = re.compile(r"^\s+(forward-backward|optimizer) \.+: \(([\d.]+), ([\d.]+)\)")

def parse(path):
    rows, current = [], None
    for line in path.read_text(errors="replace").splitlines():
        m = ITER.search(line)
        if m:
            current = {"iteration": int(m[1]), "ms": float(m[3]), "loss": float(m[4])}
            rows.append(current)
            continue
        t = TIMER.match(line)
        if t and current is not None:  # Megatron prints an iteration's timers after its line
            current[t[1] + "_ms"] = float(t[3])
    return rows

def stats(rows):
    if not rows:
        return None
    # after warm-up and compilation
    steady = [r for r in rows if r["iteration"] > max(10, len(rows) // 10)] or rows
    def median(key):
        values = [r[key] for r in steady if key in r]
        return round(statistics.median(values), 2) if values else None
    tail = rows[-10:]
    return {
        "iterations": rows[-1]["iteration"], "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
        "mean_loss_last_10": round(sum(r["loss"] for r in tail) / len(tail), 5),
        "loss_at": {str(r["iteration"]): r["loss"] for r in rows
                    if r["iteration"] in (1, 10, 25, 50, 75, 100) or r is rows[-1]},
        "median_iteration_ms": median("ms"), "median_forward_backward_ms": median("forward-backward_ms"),
        "median_optimizer_ms": median("optimizer_ms"), "steady_iterations": len(steady),
    }

runs = {name: stats(parse(out / name / "log.txt")) for name in ("muon", "adam") if (out / name / "log.txt").exists()}
summary = {"iterations_requested": iters, "runs": runs}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = ["| optimizer | iterations | lm loss first -> last (mean of last 10) | median iteration ms "
         "| median forward-backward ms | median optimizer step ms |",
         "| --- | --- | --- | --- | --- | --- |"]
for name, s in runs.items():
    if s is None:
        lines.append(f"| {name} | no iteration logged | | | | |")
        continue
    lines.append(f"| {name} | {s['iterations']} | {s['first_loss']:.3f} -> {s['last_loss']:.3f} "
                 f"({s['mean_loss_last_10']:.3f}) | {s['median_iteration_ms']} | "
                 f"{s['median_forward_backward_ms']} | {s['median_optimizer_ms']} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
bad = [name for name, s in runs.items()
       if s is None or s["iterations"] < iters or not s["last_loss"] < s["first_loss"]]
sys.exit(1 if bad or len(runs) < 2 else 0)
EOF
}

if [[ "${SUMMARY_ONLY:-0}" == 1 ]]; then summarize; exit; fi
if [[ "${DRY_RUN:-0}" != 1 ]]; then
    [[ -f "$MEGATRON_LM/pretrain_gpt.py" ]] || { echo "no pretrain_gpt.py in MEGATRON_LM=$MEGATRON_LM" >&2; exit 2; }
    if ! "$PYTHON" -c "import megatron.training.training" 2>/dev/null; then
        wheels=${WHEELS:-$root/.whl}
        echo "megatron.training not importable: installing megatron-core from $wheels" >&2
        "$PYTHON" -m pip install --quiet --no-index --find-links "$wheels" megatron-core
    fi
    # pretrain_gpt.py runs `make` in megatron/core/datasets at start-up (a Megatron-LM checkout has
    # the Makefile); an installed wheel has the helpers compiled but no Makefile: a no-op one.
    datasets=$("$PYTHON" -c "import os, megatron.core.datasets as d; print(os.path.dirname(d.__file__))")
    if [[ ! -f "$datasets/Makefile" ]] && compgen -G "$datasets/helpers_cpp*.so" >/dev/null; then
        printf 'all:\n\t@true\n' > "$datasets/Makefile"
    fi
    "$PYTHON" - <<'EOF' | tee "$out/versions.txt"
import torch, importlib.metadata as md
print("torch", torch.__version__, "| megatron-core", md.version("megatron-core"),
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
    { cat "$MEGATRON_LM/COMMIT" 2>/dev/null || true; sha256sum "$MEGATRON_LM/pretrain_gpt.py"; } | tee -a "$out/versions.txt"
fi

common="--train-iters $ITERS --lr-decay-iters $ITERS --lr-warmup-iters $(( ITERS / 10 )) --log-interval 1"
common+=" --timing-log-level 1 --eval-iters 0 --eval-interval $ITERS ${EXTRA_ARGS:-}"
status=0
for name in muon adam; do
    extra=$common
    [[ $name == adam ]] && extra+=" --optimizer adam"
    mkdir -p "$out/$name"
    EXTRA_ARGS="$extra" DRY_RUN=1 bash "$root/examples/mini/launch_torchrun.sh" > "$out/$name/args.txt"
    [[ "${DRY_RUN:-0}" == 1 ]] && continue
    echo "=== $name ($(date -u +%T))"
    if ! EXTRA_ARGS="$extra" bash "$root/examples/mini/launch_torchrun.sh" > "$out/$name/log.txt" 2>&1; then
        echo "=== $name FAILED (see $out/$name/log.txt)"; tail -n 30 "$out/$name/log.txt"; status=1
    fi
done
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
summarize || status=1
exit $status
