# Sourced by launch_torchrun.sh and launch_slurm.sbatch: builds TRAIN_ARGS from the .args files
# (model, backend, recipe, layout).
# Needs: GPUS (64, 256 or 1024), MEGATRON_LM (a Megatron-LM checkout with pretrain_gpt.py),
# DATA_PATH (Megatron .bin/.idx prefix, tokenised with Moonlight's tokenizer), CKPT_DIR.
# TRANSFORMER_IMPL=transformer_engine | local | auto picks te.args or local.args; auto (the default)
# means transformer_engine when `$PYTHON -c "import transformer_engine"` works (PYTHON: python or
# python3 on PATH), else local.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${GPUS:?set GPUS to 64, 256 or 1024}"
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout (pretrain_gpt.py)}"
: "${DATA_PATH:?set DATA_PATH to the tokenised data prefix}"
: "${CKPT_DIR:?set CKPT_DIR to the checkpoint folder}"
LAYOUT="$HERE/layouts/gpus${GPUS}.args"
[[ -f "$LAYOUT" ]] || { echo "no layout for GPUS=$GPUS (have: 64, 256, 1024)" >&2; exit 2; }
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

read_args() {  # flags of an .args file, comments dropped, no glob expansion ([0,1,...] lists)
    set -f
    local words
    words=$(sed 's/#.*//' "$1")
    # shellcheck disable=SC2206
    ARGS_OUT=($words)
    set +f
}
read_args "$HERE/model.args";  MODEL_ARGS=("${ARGS_OUT[@]}")
read_args "$BACKEND";          BACKEND_ARGS=("${ARGS_OUT[@]}")
read_args "$HERE/recipe.args"; RECIPE_ARGS=("${ARGS_OUT[@]}")
read_args "$LAYOUT";           LAYOUT_ARGS=("${ARGS_OUT[@]}")

TRAIN_ARGS=(
    "${MODEL_ARGS[@]}" "${BACKEND_ARGS[@]}" "${RECIPE_ARGS[@]}" "${LAYOUT_ARGS[@]}"
    --data-path "$DATA_PATH"
    --save "$CKPT_DIR" --load "$CKPT_DIR"
    --tensorboard-dir "$CKPT_DIR/tensorboard"
    ${EXTRA_ARGS:-}
)
export CUDA_DEVICE_MAX_CONNECTIONS=1
# The launcher installs muon-megatron (--optimizer muon, the --muon-* flags), then runs the script.
LAUNCH=(-m muon_megatron.megatron.launch "$MEGATRON_LM/pretrain_gpt.py")
