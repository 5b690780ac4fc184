#!/usr/bin/env bash
# Session 5's bench sitting (one call, <= 585 s; the plan for the next session lent a device), two pinned
# lanes side by side:
#   GPU lane, cores 0-3:  fp8.sh (skinny forms + 8B fp8/bf16 end to end), spec.sh (the speculative curve,
#                         decode-alone ratios, n-gram), biatt.sh (batch-invariant 8B end to end, now with
#                         every row on the decode tile);
#   CPU lane, cores 4-15: THREADS=12 (llama.cpp and HF at the same 12 threads in the same sitting):
#                         cpubench.sh (issue 22's table), amxb.sh (16/64-row steps beside HF, before/after),
#                         amxq.sh (int8/int4 GEMV A/B: huge pages, chunked rows).
# s5final.sh checks correctness on the same code; s5extra.sh holds what did not fit.
# Each script runs under what is left of its lane's deadline. Logs in $OUT/<script>.log.
. "$(dirname "$0")/step.sh"
stage_env
T0=$SECONDS
cpu_lane 575 cpubench:250 amxb:140 amxq:150
run_lane 0-3 575 fp8:200 spec:210 biatt:165
wait
show_lanes fp8 spec biatt cpubench amxb amxq
