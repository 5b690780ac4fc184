#!/usr/bin/env bash
# cpu_amx batch-1 decode on the AMX host (16-core Xeon), CPU only: where the time goes, and the
# OpenMP wait policy decided with numbers.
# 1. each small op at batch-1 shapes of the 1.1B Llama (rms_norm, rotary, silu_and_mul, write_kv,
#    attention, sample greedy and top-k/top-p over 32000): native's op, backend.<op>, its body
#    without dispatch, the bare C call; warm and after a 64 MB cache sweep;
# 2. end-to-end bf16 / int8 decode tok/s vs the read roofline with the per-op breakdown, under
#    halserve's default (OMP_WAIT_POLICY=PASSIVE + GOMP_SPINCOUNT=2000, a ~0.1-0.2 ms spin);
# 3. the bf16 step again with PASSIVE alone (workers sleep at once), PASSIVE + a 20000 spin, and
#    ACTIVE (spin for ever);
# 4. cpu_amx conformance: the quick op cases and every sample case (the new C sampler).
# Run from the repo root: bash bench/device/cpuperf.sh (about 90 s; the step limits add up to 141 s)
. "$(dirname "$0")/step.sh"; cpu_stage_env
unset OMP_WAIT_POLICY GOMP_SPINCOUNT  # halserve's own default unless a step sets one
STEP_TAIL=40
# the first step also compiles the amx tier's C library (cached in $HALSERVE_CACHE_DIR)
step cpuperf_ops 35 python3 -m halserve.hal.cpu_amx.perf --threads "$T" --ops --no-kernels --no-steps \
  --json "$OUT/cpuperf_ops.json"
step cpuperf_steps 38 python3 -m halserve.hal.cpu_amx.perf --threads "$T" --quant none,int8 --no-kernels \
  --steps 6 --json "$OUT/cpuperf_steps.json"
STEP_TAIL=22
OMP_WAIT_POLICY=PASSIVE step cpuperf_steps_passive 15 python3 -m halserve.hal.cpu_amx.perf --threads "$T" \
  --quant none --no-kernels --steps 5 --json "$OUT/cpuperf_steps_passive.json"
OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=20000 step cpuperf_steps_spin20k 15 python3 -m halserve.hal.cpu_amx.perf \
  --threads "$T" --quant none --no-kernels --steps 5 --json "$OUT/cpuperf_steps_spin20k.json"
OMP_WAIT_POLICY=ACTIVE step cpuperf_steps_active 15 python3 -m halserve.hal.cpu_amx.perf --threads "$T" \
  --quant none --no-kernels --steps 5 --json "$OUT/cpuperf_steps_active.json"
STEP_TAIL=4
step cpuperf_conformance 11 python3 -m halserve conformance --backend cpu_amx --quick
STEP_TAIL=14
step cpuperf_sample_conformance 12 python3 -m halserve conformance --backend cpu_amx --op sample
