#!/usr/bin/env bash
# Session 6's one sitting (<= 560 s), after s5final found the fused rotary_write_kv race on the H200
# (fixed in 8cae620) and fastapi needing opentelemetry (carried now). Two pinned lanes:
#   GPU lanes (correctness only, sharing the GPU): cores 0-1 the speculative-decoding test files whole
#     (spectests.sh, issue 21); cores 2-3 cuda conformance of the ops that write the cache, the two GPU
#     test files that failed (test_cuda_backend, test_engine_gpu) with the fused-op tests, the engine tier;
#   CPU lane, cores 4-15, THREADS=12: cpubench.sh (issue 22's table), amxb.sh (16/64
#     sequences), amxq.sh (int8/int4 GEMVs).
# Logs in $OUT/<stage>.log; correctness only in the GPU lane, so its timing does not matter.
. "$(dirname "$0")/step.sh"
stage_env
T0=$SECONDS
cpu_lane 550 cpubench:260 amxb:150 amxq:140
( OMP_NUM_THREADS=2 run_lane 0-1 545 spectests:300 ) &
OMP_NUM_THREADS=2 run_lane 2-3 545 s6gpu:545
wait
show_lanes spectests s6gpu cpubench amxb amxq
