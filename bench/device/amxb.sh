#!/usr/bin/env bash
# cpu_amx batched decode on the AMX host (16-core Xeon), CPU only (issue 22, helper AMXB):
# 1. the skinny bf16 GEMMs of a 1.1B decode step, M = 1..128 rows: the AMX tile kernel
#    (gemm_amx.c, W prefetch distance swept) beside the C GEMV and torch's oneDNN, weights
#    streamed from DRAM, as GB/s and % of the measured read bandwidth;
# 2. 16- and 64-sequence decode steps (32-token prompts, random TinyLlama-shape bf16) through
#    the engine with the AMX GEMM on and off, steps interleaved, beside HF transformers' forward
#    with its KV cache in the same process; then where each step's time goes, op by op; then the
#    engine default (captured steps, graph.py) with the AMX GEMM on;
# 3. python -m pytest -q tests/hal/test_cpu_amx_batched.py, then tests/hal/test_cpu_amx.py.
# 0. (session 5, first) amxb_step.py --s5: 16- and 64-sequence steps before (eager, AVX-512 attention
#    span) / +AMX attention / after (captured 16..64-row buckets + AMX attention), interleaved in one
#    process, beside HF's step: the issue's ">= 3x HF at 16 and 64 sequences" figure.
# Run from the repo root: bash bench/device/amxb.sh (step limits add up to 144 s)
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TRANSFORMERS_VERBOSITY=error HALSERVE_CACHE_DIR=${HALSERVE_CACHE_DIR:-/tmp/halserve-cache} CUDA_VISIBLE_DEVICES=
T=${THREADS:-16}
export OMP_NUM_THREADS=$T
# the random 1.1B checkpoint (2.2 GB): the one cpugraph.sh leaves in the repo root (s5bench runs it
# first), else one written to RAM where there is room (writing it to disk costs seconds)
WORK=""
if [ -f cpu-1.1b-L22-V32000-random-bf16/config.json ]; then WORK=.
elif [ "$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)" -gt 8 ] 2>/dev/null; then
  WORK=/dev/shm/amxb-cache; mkdir -p $WORK; fi
. "$(dirname "$0")/step.sh"
STEP_TAIL=4
# the amx tier's C library compiled once (cached in $HALSERVE_CACHE_DIR) before anything is timed
step amxb_build 12 python3 -c "from halserve.hal.cpu_amx.tiers import choose; t = choose(); print(t.name, '|', t.reason)"
STEP_TAIL=12
step amxb_s5 40 python3 bench/device/amxb_step.py --s5 --rows 16,64 --prompt 32 --steps 8 \
  ${WORK:+--work-dir $WORK} --json "$OUT/amxb_s5.json"
STEP_TAIL=20
step amxb_step 35 python3 bench/device/amxb_step.py --rows 16,64 --prompt 32 --steps 4 --profile-steps 2 --no-hf \
  ${WORK:+--work-dir $WORK} --json "$OUT/amxb_step.json"
STEP_TAIL=300
step amxb_kernels 20 python3 bench/device/amxb_kernels.py --set-mb 400 --reps 3 --json "$OUT/amxb_kernels.json"
STEP_TAIL=6
step amxb_tests_batched 14 python3 -m pytest -q -p no:cacheprovider tests/hal/test_cpu_amx_batched.py
# the rest of tests/hal/test_cpu_amx*.py runs in amxq.sh, amxmoe.sh and cpugraph.sh; the core file here
step amxb_tests 15 python3 -m pytest -q -p no:cacheprovider tests/hal/test_cpu_amx.py
rm -rf /dev/shm/amxb-cache  # give the RAM back
