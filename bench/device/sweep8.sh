#!/usr/bin/env bash
# Issue 20, session 4: the fp8 skinny-GEMM config sweep on the H200 (8B shapes at M = 1/4/16,
# then the 1B shapes at M = 1), stage A (tile, split, kind) then stage B (FUSED reduction,
# QUANT_IN), compiled first in 8 processes; then the skinny kernel's GPU tests (fused
# reduction replayed in graphs, gemv forms, in-kernel quantization). About 200 s.
. "$(dirname "$0")/step.sh"
stage_env
STEP_TAIL=40 step sweep_fp8 150 python3 bench/skinny_gemm.py --sweep --warm 8 --budget 100 \
    --parts fp8,fp8_1b --json "$OUT/sweep_fp8.json"
STEP_TAIL=20 step skinny_tests 45 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_skinny_gpu.py
echo "[sweep8] done in ${SECONDS}s"
