#!/usr/bin/env bash
# cpu_amx decode graphs (issue 22) on the AMX host, CPU only, 16 threads:
# 1. batch-1 decode through the engine with and without the captured step (one engine, the
#    two interleaved), on a tiny-hidden 22-layer model (its step is all overhead) and the 1.1B
#    shape (bf16): tok/s, ms a step, the forward alone, capture time, vs the read roofline,
#    greedy tokens + logprobs compared bit for bit;
# 2. tests/hal/test_cpu_amx_graph.py (the AMX tier's kernels replayed).
# Run from the repo root: bash bench/device/cpugraph.sh (about 90 s; the step limits add up to 150 s)
. "$(dirname "$0")/step.sh"; cpu_stage_env
STEP_TAIL=12
# the first step also compiles the amx tier's C library (cached in $HALSERVE_CACHE_DIR)
step cpugraph_tiny 40 python3 bench/device/cpugraph.py --shapes tiny --threads "$T" --tokens 48 --repeats 5 \
  --json "$OUT/cpugraph_tiny.json"
step cpugraph_1b 60 python3 bench/device/cpugraph.py --shapes 1.1b --threads "$T" --tokens 32 --repeats 3 \
  --json "$OUT/cpugraph_1b.json"
STEP_TAIL=8
OMP_NUM_THREADS=$T step cpugraph_tests 50 python3 -m pytest -q -p no:cacheprovider tests/hal/test_cpu_amx_graph.py
