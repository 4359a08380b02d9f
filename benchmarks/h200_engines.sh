#!/usr/bin/env bash
# The engine runs on one GPU (issues 5 and 6), as run on an H200 through the device tool:
#
#   bash benchmarks/h200_engines.sh OUT_DIR STAGE...
#
# STAGE is one of
#   demo-mini        muon-megatron demo on Moonlight-mini, --engine auto (megatron-core on a GPU)
#   demo-mini-ds     the same through the DeepSpeed adapter (--engine deepspeed)
#   demo-gpu         muon-megatron demo --model moonlight-mini-gpu through megatron-core
#   ds-bench         benchmarks/deepspeed_vs_builtin.py on the GPU, ZeRO-1, DP 1
#
# Each stage writes its log (and its files) under OUT_DIR/<stage>. A stage that fails is reported
# and the next one runs. Needs megatron-core and DeepSpeed importable (the device tool carries them
# as wheels: see benchmarks/results/engines_h200.md).
set -u
out=$1
shift
export PYTHONUNBUFFERED=1
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
status=0
for stage in "$@"; do
  mkdir -p "$out/$stage"
  echo "=== $stage ($(date -u +%T))"
  start=$(date +%s)
  case $stage in
    demo-mini)
      cmd=(python3 -m muon_megatron.cli demo --engine auto --out "$out/$stage" --no-progress) ;;
    demo-mini-ds)
      cmd=(python3 -m muon_megatron.cli demo --engine deepspeed --out "$out/$stage" --no-progress) ;;
    demo-gpu)
      cmd=(python3 -m muon_megatron.cli demo --model moonlight-mini-gpu --engine megatron --out "$out/$stage"
           --no-progress ${DEMO_GPU_ARGS:-}) ;;
    ds-bench)
      cmd=(python3 "$root/benchmarks/deepspeed_vs_builtin.py" --device cuda --world 1 ${DS_BENCH_ARGS:-}
           --json "$out/$stage/deepspeed_vs_builtin.json") ;;
    *)
      echo "unknown stage $stage" >&2
      exit 2 ;;
  esac
  set -o pipefail
  if ! timeout "${STAGE_TIMEOUT:-400}" "${cmd[@]}" 2>&1 | tee "$out/$stage/log.txt" | { grep -v -i "warn" || true; }; then
    echo "=== $stage FAILED"
    status=1
  fi
  echo "=== $stage took $(( $(date +%s) - start )) s"
done
exit $status
