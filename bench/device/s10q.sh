#!/usr/bin/env bash
# Issue 22, a short sitting's first CPU stage (<= 85 s, 16 threads alone on the AMX host): s9p.sh's two
# diagnostics only, the 1.1B GEMVs per thread count beside a read probe (does int4 stop scaling where bf16
# and int8 go on?) and the prefill GEMMs per thread count (oneDNN against the AMX kernel).
# `lead.sh s10q:85 s7g:212 s10b:125` when the budget is short; s9p.sh (the full CPU phase) sources it first.
. "$(dirname "$0")/step.sh"
cpu_stage_env
STEP_TAIL=9 step q_threads 55 python3 bench/device/q_threads.py --threads 1,2,4,8,12,16 --set-mb 768 --reps 2
STEP_TAIL=9 step gemm_threads 25 python3 bench/device/gemm_threads.py --threads 2,4,8,16 --reps 2
