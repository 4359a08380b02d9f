#!/usr/bin/env bash
# Moonlight-mini with muon-megatron's Muon on Megatron-LM's pretrain_gpt.py, one node.
#
#   MEGATRON_LM=~/Megatron-LM bash launch_torchrun.sh                 # mock data, 1 GPU
#   NPROC=8 EP=4 MEGATRON_LM=~/Megatron-LM DATA_PATH=/data/bytes_text_document bash launch_torchrun.sh
#
# Data: byte-level token ids (vocabulary 256); without DATA_PATH Megatron's --mock-data is used.
# TRANSFORMER_IMPL=transformer_engine | local | auto picks te.args or local.args; auto (the default)
# means transformer_engine when `$PYTHON -c "import transformer_engine"` works (PYTHON: python or
# python3 on PATH), else local.
# DRY_RUN=1 prints the arguments instead of launching. EXTRA_ARGS="..." appends flags.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout (pretrain_gpt.py)}"
NPROC="${NPROC:-1}"
IMPL="${TRANSFORMER_IMPL:-auto}"
if [[ "$IMPL" == auto ]]; then
    PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
    if "$PY" -c "import transformer_engine" 2>/dev/null; then IMPL=transformer_engine; else IMPL=local; fi
    echo "TRANSFORMER_IMPL=auto: using $IMPL" >&2
fi
case "$IMPL" in
    transformer_engine) BACKEND="$HERE/te.args" ;;
    local) BACKEND="$HERE/local.args" ;;
    *) echo "TRANSFORMER_IMPL=$IMPL: use transformer_engine, local or auto" >&2; exit 2 ;;
esac
set -f
# shellcheck disable=SC2207
ARGS=($(sed 's/#.*//' "$HERE/model.args" "$BACKEND" "$HERE/recipe.args"))
set +f
ARGS+=(--expert-model-parallel-size "${EP:-1}" --tensor-model-parallel-size "${TP:-1}")
if [[ -n "${DATA_PATH:-}" ]]; then ARGS+=(--data-path "$DATA_PATH" --split 98,1,1); else ARGS+=(--mock-data); fi
if [[ -n "${CKPT_DIR:-}" ]]; then ARGS+=(--save "$CKPT_DIR" --save-interval 500); fi
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})
LAUNCH=(-m muon_megatron.megatron.launch "$MEGATRON_LM/pretrain_gpt.py")
if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%s\n' "${LAUNCH[@]}" "${ARGS[@]}"; exit 0; fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun --standalone --nproc-per-node "$NPROC" "${LAUNCH[@]}" "${ARGS[@]}"
