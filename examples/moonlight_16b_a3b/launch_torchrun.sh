#!/usr/bin/env bash
# Moonlight-16B-A3B with muon-megatron's Muon on Megatron-LM: run once on every node.
#
#   GPUS=64 NNODES=8 NODE_RANK=0 MASTER_ADDR=node0 MEGATRON_LM=~/Megatron-LM \
#   DATA_PATH=/data/moonlight_text_document CKPT_DIR=/ckpt/moonlight bash launch_torchrun.sh
#
# TRANSFORMER_IMPL=transformer_engine | local | auto (default) picks te.args or local.args (common.sh).
# DRY_RUN=1 prints the arguments instead of launching.
# EXTRA_ARGS="..." appends flags (e.g. --recompute-granularity selective, --exit-interval 100).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NNODES="${NNODES:-$((GPUS / NPROC_PER_NODE))}"
if (( NNODES * NPROC_PER_NODE != GPUS )); then
    echo "NNODES ($NNODES) x NPROC_PER_NODE ($NPROC_PER_NODE) must equal GPUS ($GPUS)" >&2; exit 2
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then  # print the flags, one per line, and stop
    printf '%s\n' "${LAUNCH[@]}" "${TRAIN_ARGS[@]}"; exit 0
fi
exec torchrun \
    --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    "${LAUNCH[@]}" "${TRAIN_ARGS[@]}"
