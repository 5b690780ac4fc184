#!/usr/bin/env bash
# Issue 20, session 4 (helper FP8), one H200, <= 220 s, fine on 4 cores (s5bench.sh's GPU lane):
#   OUT=<dir> bash bench/device/fp8.sh
# (Written for session 4's 22:40 sitting; no device was lent then: not run yet.)
# 1. sweep of the session-4 skinny forms only (gemvr loop, in-kernel quantization in the
#    tensor-core form, PDL launches) against the tuned table (configs.SKINNY_TUNED, from the
#    21:08 sweep) on the 8B shapes, compiled first in 4 processes; it writes the fastest config
#    per shape;
# 2. end to end, 8B shape, on those winners ($HALSERVE_SKINNY_CONFIGS): fp8 W8A8 and bf16,
#    batch-1 ms/token and batch 1/16/64/256 tok/s, the kernel tables of one decode step at
#    batch 1 and 16;
# 3. the GPU test of the winners on the 8B shapes (eager and replayed from graphs), if time is
#    left (s5final.sh runs all of tests/gpu and the full conformance on the committed table).
. "$(dirname "$0")/step.sh"
stage_env
git log --oneline -1 2>/dev/null | head -1
STEP_TAIL=30 step fp8_sweep 70 python3 bench/skinny_gemm.py --sweep --warm 4 --budget 34 \
    --parts fp8_new --json "$OUT/fp8_sweep.json" --emit-table "$OUT/fp8_table.json"
# the engine runs on what this sweep found (the fastest of the table and the new forms per shape)
[ -s "$OUT/fp8_table.json" ] && export HALSERVE_SKINNY_CONFIGS="$OUT/fp8_table.json"
echo "HALSERVE_SKINNY_CONFIGS=${HALSERVE_SKINNY_CONFIGS:-}"
STEP_TAIL=12 step fp8_e2e 120 python3 bench/e2e_decode.py --preset llama-8b --variants fp8,bf16 \
    --batches 16,1,64,256 --profile 4 --json "$OUT/fp8_e2e.json"
STEP_TAIL=8 step fp8_tests 25 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_skinny_gpu.py \
    -k "tuned_configs or pdl"
echo "[fp8] done in ${SECONDS}s"
