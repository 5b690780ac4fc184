#!/usr/bin/env bash
# The cuda checks after the rotary_write_kv barrier fix (8cae620): conformance of the two ops that
# write the cache, the engine tier, the GPU test files that failed in s5final and the fused-op tests.
. "$(dirname "$0")/step.sh"
stage_env
STEP_TAIL=8 step conf_ops 60 python3 -m halserve conformance --backend cuda --op rotary_write_kv --op write_kv --op rotary
STEP_TAIL=20 step gpu_tests 300 python3 -m pytest -q -p no:cacheprovider -rfEs tests/hal/test_triton_fused.py \
    tests/gpu/test_cuda_backend.py tests/gpu/test_engine_gpu.py
STEP_TAIL=12 step engine_tier 150 python3 -m halserve conformance --engine --backend cuda
echo "--- [$SECONDS s] done"
