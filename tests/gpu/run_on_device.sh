#!/usr/bin/env bash
# The NCCL parity runner on a machine with two GPUs, from the repository root:
#   bash tests/gpu/run_on_device.sh [OUT_DIR] [extra run_nccl_parity.py flags]
# Installs the wheels in .whl/ (megatron-core 0.19.2, deepspeed 0.19.8 and the dependencies the
# machine lacks) into $WHEEL_SITE (default /tmp/site) unless megatron-core and deepspeed already
# import, runs every case, and leaves nccl_parity.json, nccl_parity.md and nccl_parity.log in
# OUT_DIR (default: $OUT).
# Exit status: the runner's (0 when every case passed).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
out="${1:-${OUT:?pass an output folder or set OUT}}"
shift $(( $# > 0 ? 1 : 0 ))
# NVLink multicast stays off on shared GPU hosts, in this shell and every process it starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
site="${WHEEL_SITE:-/tmp/site}"
if ! python3 -c "import megatron.core, megatron.training, deepspeed" >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "installing .whl/*.whl failed" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nccl_parity.log" 2>&1
python3 tests/gpu/run_nccl_parity.py --backend nccl --out "$out" "$@" 2>&1 | tee -a "$out/nccl_parity.log"
exit "${PIPESTATUS[0]}"
