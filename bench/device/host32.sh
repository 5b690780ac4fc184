#!/usr/bin/env bash
# Engine host time per decode step at 1/16/32/64 rows on the AMX host's CPU (helper HOST32,
# issues 19/22): bench/engine_host.py with the model stubbed (a table lookup 32k logits wide),
# the captured path (the replaying test double, and cpu_amx's own graphs) and the eager one
# (native); the CPU time a step less the stubbed model, the replays and the HAL's draw.
# Compare with docs/performance.md "Session 5: host time at 16-64 rows" (this 2-vCPU box).
# Run from the repo root: bash bench/device/host32.sh (CPU only; step limits add up to 240 s)
. "$(dirname "$0")/step.sh"; cpu_stage_env
STEP_TAIL=12
step host32_graphs_native 100 python3 bench/engine_host.py --backend test_replay_graphs,native --reps 3
step host32_cpu_amx 80 python3 bench/engine_host.py --backend cpu_amx --reps 3
step host32_profile32 60 python3 bench/engine_host.py --backend test_replay_graphs --batch 32 --profile
echo "done in $SECONDS s; logs in $OUT"
