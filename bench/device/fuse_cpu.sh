#!/usr/bin/env bash
# FUSE (issue 22) on the AMX host, CPU only, 16 threads, about 2 minutes:
# 1. the small ops at batch-1 shapes warm and cold (a 64 MB sweep first), rotary and write_kv
#    beside the fused rotary_write_kv row (python -m halserve.hal.cpu_amx.perf --ops);
# 2. batch-1 decode through one engine with the fused op and with rotary then write_kv,
#    interleaved, eager and graph-replayed, tiny-hidden 22 layers and the 1.1B shape (bf16),
#    tokens + logprobs compared (bench/fuse_cpu.py);
# 3. the fused op's cpu_amx tests on the AMX tier.
# Run from the repo root: bash bench/device/fuse_cpu.sh (the step limits add up to 150 s)
. "$(dirname "$0")/step.sh"; cpu_stage_env
STEP_TAIL=24
# the first step also compiles the amx tier's C library (cached in $HALSERVE_CACHE_DIR)
step fuse_ops 30 python3 -m halserve.hal.cpu_amx.perf --ops --no-kernels --no-steps --threads "$T" \
  --json "$OUT/fuse_ops.json"
STEP_TAIL=8
step fuse_step_tiny 30 python3 bench/fuse_cpu.py --shapes tiny --threads "$T" --tokens 24 --repeats 7 \
  --json "$OUT/fuse_step_tiny.json"
step fuse_step_1b 65 python3 bench/fuse_cpu.py --shapes 1.1b --threads "$T" --tokens 12 --repeats 4 \
  --json "$OUT/fuse_step_1b.json"
OMP_NUM_THREADS=$T step fuse_cpu_tests 25 python3 -m pytest -q -p no:cacheprovider tests/hal/test_cpu_amx_fused.py
echo "[fuse_cpu] done in ${SECONDS}s"
