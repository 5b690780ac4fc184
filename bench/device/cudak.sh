#!/usr/bin/env bash
# CUDAK (issue 20) device stage 1, about 5 minutes on one H200: run from the repo root as
#   OUT=<dir> bash bench/device/cudak.sh
# (a) skinny GEMM config sweep: fp8 W8A8 on the 8B shapes at M=1,4,16, and the batch-invariant
#     GEMM at M=64 and 4096 (which tile changes keep a row's bits); the 15:54 run already has
#     the bf16 part (CUDAK_SWEEP_PARTS=fp8,bf16,bi,bf16_1b for all of it);
# (b)+(d) bench/e2e_decode.py on the 8B shape, fp8 (gemv one-kernel linears), bf16 and bf16-bi,
#     batch 1, 64 and 256 (bi: 64), each batch size warmed first, with the kernel table of one decode step at batch 1 and 64;
# then the GPU tests: the skinny kernel's forms, the backend's batch-invariance / fp8 / graph
# tests, the Triton kernel tests that touch GEMMs.
. "$(dirname "$0")/step.sh"
stage_env
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -2
[ "${CUDAK_SWEEP_PARTS:-}" = none ] || STEP_TAIL=40 step cudak_sweep 90 python3 bench/skinny_gemm.py --sweep --warm 14 --budget 52 \
    --parts "${CUDAK_SWEEP_PARTS:-fp8,bi}" --json "$OUT/cudak_sweep.json"
step cudak_e2e_8b 125 python3 bench/e2e_decode.py --preset llama-8b --variants fp8,bf16,bf16-bi \
    --batches 64,256 --bi-batches 64 --profile 6 --json "$OUT/cudak_e2e_8b.json"
STEP_TAIL=30 step cudak_tests 80 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_backend.py \
    tests/gpu/test_bi_gemm_gpu.py tests/gpu/test_skinny_gpu.py tests/hal/test_triton_kernels.py \
    -k "skinny or invariant or fp8 or graph or linear or persistent or row_bits"
echo "[cudak] done in ${SECONDS}s"
