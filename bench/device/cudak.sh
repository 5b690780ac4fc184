#!/usr/bin/env bash
# CUDAK (issue 20) device stage 1, about 5 minutes on one H200: run from the repo root as
#   OUT=<dir> bash bench/device/cudak.sh
# (a) skinny GEMM config sweep (fp8 W8A8 and bf16, 8B shapes at M=1,4,16; 1B bf16 at M=1;
#     the batch-invariant GEMM at M=64 and 4096) against the read bandwidth and cuBLAS;
# (b)+(d) bench/e2e_decode.py on the 8B shape: bf16, fp8, bf16-bi at batch 1 and 64 (bf16 and
#     fp8 also 256), with the kernel table of one decode step at batch 1 and 64;
# (c) the 1B bf16 decode step's kernel table (and its e2e figures);
# then the GPU tests of the Triton kernels and the cuda backend (batch invariance, fp8).
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TRANSFORMERS_VERBOSITY=error
unset TRITON_INTERPRET
. "$(dirname "$0")/step.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -2
STEP_TAIL=30 step cudak_sweep 100 python3 bench/skinny_gemm.py --sweep --warm 14 --budget 58 \
    --json "$OUT/cudak_sweep.json"
step cudak_e2e_8b 125 python3 bench/e2e_decode.py --preset llama-8b --variants bf16,bf16-bi,fp8 \
    --batches 64,256 --bi-batches 64 --profile 6 --json "$OUT/cudak_e2e_8b.json"
step cudak_e2e_1b 25 python3 bench/e2e_decode.py --preset llama-1b --variants bf16 --batches 64 --profile 16 \
    --json "$OUT/cudak_e2e_1b.json"
step cudak_tests 50 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_skinny_gpu.py tests/gpu/test_cuda_backend.py \
    tests/hal/test_triton_kernels.py -k "skinny or invariant or fp8 or graph or linear or persistent"
echo "[cudak] done in ${SECONDS}s"
