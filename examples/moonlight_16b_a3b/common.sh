# Sourced by launch_torchrun.sh and launch_slurm.sbatch: builds TRAIN_ARGS from the .args files.
# Needs: GPUS (64, 256 or 1024), MEGATRON_LM (a Megatron-LM checkout with pretrain_gpt.py),
# DATA_PATH (Megatron .bin/.idx prefix, tokenised with Moonlight's tokenizer), CKPT_DIR.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${GPUS:?set GPUS to 64, 256 or 1024}"
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout (pretrain_gpt.py)}"
: "${DATA_PATH:?set DATA_PATH to the tokenised data prefix}"
: "${CKPT_DIR:?set CKPT_DIR to the checkpoint folder}"
LAYOUT="$HERE/layouts/gpus${GPUS}.args"
[[ -f "$LAYOUT" ]] || { echo "no layout for GPUS=$GPUS (have: 64, 256, 1024)" >&2; exit 2; }

read_args() {  # flags of an .args file, comments dropped, no glob expansion ([0,1,...] lists)
    set -f
    local words
    words=$(sed 's/#.*//' "$1")
    # shellcheck disable=SC2206
    ARGS_OUT=($words)
    set +f
}
read_args "$HERE/model.args";  MODEL_ARGS=("${ARGS_OUT[@]}")
read_args "$HERE/recipe.args"; RECIPE_ARGS=("${ARGS_OUT[@]}")
read_args "$LAYOUT";           LAYOUT_ARGS=("${ARGS_OUT[@]}")

TRAIN_ARGS=(
    "${MODEL_ARGS[@]}" "${RECIPE_ARGS[@]}" "${LAYOUT_ARGS[@]}"
    --data-path "$DATA_PATH"
    --save "$CKPT_DIR" --load "$CKPT_DIR"
    --tensorboard-dir "$CKPT_DIR/tensorboard"
    ${EXTRA_ARGS:-}
)
export CUDA_DEVICE_MAX_CONNECTIONS=1
# The launcher installs muon-megatron (--optimizer muon, the --muon-* flags), then runs the script.
LAUNCH=(-m muon_megatron.megatron.launch "$MEGATRON_LM/pretrain_gpt.py")
