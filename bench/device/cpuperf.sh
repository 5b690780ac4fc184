#!/usr/bin/env bash
# cpu_amx batch-1 decode on the AMX host (16-core Xeon), CPU only, <= 90 s: where the time
# goes. Per-kernel GB/s of every linear of the 1.1B shape at M = 1 (bare C call and through
# backend.linear, software prefetch off and on) vs a measured read bandwidth; end-to-end
# decode tok/s for bf16 / int8 / int4 with a per-op breakdown (us per op, time outside the
# ops); 32 sequences' decode step, native and cpu_amx beside HF transformers (bf16); cpu_amx
# conformance (quick op cases); the bf16 step again with OMP_WAIT_POLICY=ACTIVE and with GOMP_SPINCOUNT.
# Run from the repo root: bash bench/device/cpuperf.sh (about 85 s; the step limits add up to 130 s)
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TRANSFORMERS_VERBOSITY=error HALSERVE_CACHE_DIR=${HALSERVE_CACHE_DIR:-/tmp/halserve-cache} CUDA_VISIBLE_DEVICES=
T=${THREADS:-16}
. "$(dirname "$0")/step.sh"
STEP_TAIL=60
# the first step also compiles the amx tier's C library (cached in $HALSERVE_CACHE_DIR)
step cpuperf_kernels 26 python3 -m halserve.hal.cpu_amx.perf --threads "$T" --quant none,int8,int4,int8_w8a8 --no-steps \
  --prefetch 0,512 --set-mb 1024 --json "$OUT/cpuperf_kernels.json"
step cpuperf_steps 36 python3 -m halserve.hal.cpu_amx.perf --threads "$T" --quant none,int4,int8 --no-kernels \
  --steps 6 --json "$OUT/cpuperf_steps.json"
# halserve/__init__.py sets OMP_WAIT_POLICY=PASSIVE (workers sleep after every parallel
# region, so each kernel call wakes 15 threads): the bf16 decode step again with workers that
# spin (ACTIVE), and with PASSIVE plus a bounded spin (GOMP_SPINCOUNT, ~0.1 ms, overrides it)
STEP_TAIL=30
OMP_WAIT_POLICY=ACTIVE step cpuperf_steps_active 15 python3 -m halserve.hal.cpu_amx.perf --threads "$T" --quant none \
  --no-kernels --steps 5 --json "$OUT/cpuperf_steps_active.json"
GOMP_SPINCOUNT=200000 step cpuperf_steps_spin 15 python3 -m halserve.hal.cpu_amx.perf --threads "$T" --quant none \
  --no-kernels --steps 5 --json "$OUT/cpuperf_steps_spin.json"
STEP_TAIL=8
step cpuperf_batched 18 python3 -m halserve.hal.cpu_amx.perf --threads "$T" --no-kernels --no-steps --batched 32 \
  --batched-backends native,cpu_amx --batched-prompt 64 --steps 5 --json "$OUT/cpuperf_batched.json"
step cpuperf_conformance 10 python3 -m halserve conformance --backend cpu_amx --quick
