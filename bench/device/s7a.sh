#!/usr/bin/env bash
# Session 7's first sitting (<= 585 s): issue 20's figures end to end on the final code, and the
# cpu_amx tests on the AMX tier beside them (small shapes: cache-bound, on cores the GPU lane does not use).
#   cores 0-7, the GPU: the 8B shape through LLM.generate (bf16, fp8 W8A8, both batch-invariant; batch 1
#     ms/token with % of the read roofline, batches 16/64/256 tok/s; HF transformers beside; the kernel
#     table of one decode step at batch 1 and 16, and at 64 for the batch-invariant rows), then the 1B
#     shape (bf16 and fp8, batch 1 and 64, the kernel table of a batch-1 step: the captured step against
#     its floor), then the GPU test files with what is left;
#   cores 8-15, CPU only (CUDA_VISIBLE_DEVICES=): the cpu_amx tests and its quick conformance.
. "$(dirname "$0")/step.sh"
stage_env
T0=$SECONDS
( export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=8 HALSERVE_CACHE_DIR=/tmp/halserve-cache
  STEP_TAIL=10 step amx_tests 330 taskset -c 8-15 python3 -m pytest -q -p no:cacheprovider -rfEs tests/hal/test_cpu_amx*.py \
      tests/hal/test_bad_indices.py
  STEP_TAIL=6 step amx_conf 150 taskset -c 8-15 python3 -m halserve conformance --backend cpu_amx --quick ) > "$OUT/amx_lane.txt" 2>&1 &
export OMP_NUM_THREADS=8
STEP_TAIL=14 step e2e_8b 330 taskset -c 0-7 python3 bench/e2e_decode.py --preset llama-8b --variants bf16,fp8,bf16-bi,fp8-bi \
    --batches 16,1,64,256 --bi-batches 64,1 --profile 4 --hf-peer --json "$OUT/e2e_8b.json"
STEP_TAIL=10 step e2e_1b 120 taskset -c 0-7 python3 bench/e2e_decode.py --preset llama-1b --variants bf16,fp8 --batches 1,64 \
    --profile 6 --hf-peer --json "$OUT/e2e_1b.json"
left=$((570 - (SECONDS - T0)))
[ "$left" -gt 30 ] && STEP_TAIL=12 step gpu_tests "$left" taskset -c 0-7 python3 -m pytest -q -p no:cacheprovider -rfEs \
    tests/gpu/test_engine_gpu.py tests/gpu/test_cuda_backend.py tests/hal/test_triton_fused.py tests/gpu
wait
echo "=================== amx lane"; cat "$OUT/amx_lane.txt"
