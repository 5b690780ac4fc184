#!/usr/bin/env bash
# FUSE (issues 20 and 22) device stage, about 2.5 minutes on one H200: run from the repo root as
#   OUT=<dir> bash bench/device/fuse.sh
# (a) cuda conformance of the fused rotary_write_kv with rotary and write_kv beside it, --perf:
#     us a call of the fused kernel vs the two it replaces, same process;
# (b) the fused kernel's tests on the GPU (equal to rotary then write_kv; the cache bit-exact);
# (c) bench/e2e_decode.py on the 1B shape, bf16 batch 1, with the kernel table of one decode
#     step: rotary (28 us) + write_kv (21 us) a step in the session-2 table should be one
#     rotary_write_kv kernel line (~25-30 us), 16 launches a step fewer.
. "$(dirname "$0")/step.sh"
stage_env
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -2
STEP_TAIL=40 step fuse_conformance 45 python3 -m halserve conformance --backend cuda --op rotary --op write_kv \
    --op rotary_write_kv --perf
step fuse_tests 30 python3 -m pytest -q -p no:cacheprovider tests/hal/test_triton_fused.py
STEP_TAIL=40 step fuse_e2e_1b 70 python3 bench/e2e_decode.py --preset llama-1b --variants bf16 --batches 1 \
    --output-len 64 --profile 6 --json "$OUT/fuse_e2e_1b.json"
echo "[fuse] done in ${SECONDS}s"
