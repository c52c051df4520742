#!/usr/bin/env bash
# The GPU check, one script, <= 8 minutes on an H200 (each phase has its own time limit):
#   1. the GPU tests: every kernel against the reference on CuPy arrays (tests/sim_kernels.py
#      with RANDYGPT_GPU=1), a short training run on the GPU (float32 and bf16) resumed on the
#      CPU from its checkpoint, the bf16 cuBLAS product against float32 math on bf16 operands;
#   2. benchmarks/gpu_bench.py: training tokens/s for configs A, B and the 124M (GPT-2 small
#      shape) config, randyGPT's cupy backend (float32, bf16) against PyTorch on the same
#      architecture (bf16 autocast; eager and torch.compile), peak GPU memory, single-stream
#      generation.
# Needs: an NVIDIA GPU, python3 with CuPy, numba-cuda, PyTorch (CUDA), numpy, safetensors,
# tokenizers, tqdm, pytest. Writes its logs and bench.json to $OUT (default /tmp/gpu_check).
#   bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RANDYGPT_GPU=1
unset NUMBA_ENABLE_CUDASIM
status=0

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
$PY -c "import sys, numpy, numba, numba.cuda, cupy, torch; print('python', sys.version.split()[0],
'numpy', numpy.__version__, 'numba', numba.__version__, 'cupy', cupy.__version__, 'torch',
torch.__version__, 'torch sees cuda:', torch.cuda.is_available())" 2>&1 | tee "$OUT/versions.txt"

echo "== GPU tests (limit 150 s)"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/sim_kernels.py \
    tests/test_cupy_backend.py -k "sim_kernels or on_gpu" \
    2>&1 | tee "$OUT/tests.txt" || status=1

echo "== training and generation (limit 300 s)"
timeout 300 $PY benchmarks/gpu_bench.py --configs A B 124M --seconds 6 --json "$OUT/bench.json" \
    2>&1 | tee "$OUT/bench.txt" || status=1
exit $status
