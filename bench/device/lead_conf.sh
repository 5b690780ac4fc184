#!/usr/bin/env bash
# Issue 15's H200 checks after the day's kernel changes: cuda's full conformance (every op case,
# both call forms) and its engine tier; beside them, on 8 other host cores, cpu_amx's tests on the
# AMX CPU (tier kernels, conformance cases, HF float32 parity: issue 22). Correctness only: the
# two share the host, nothing here is timed. <= 330 s.
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
unset TRITON_INTERPRET
. "$(dirname "$0")/step.sh"
( export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=8 HALSERVE_CACHE_DIR=/tmp/halserve-cache
  timeout -k 5 320 taskset -c 8-15 python3 -m pytest -q -p no:cacheprovider tests/hal/test_cpu_amx*.py \
    > "$OUT/amx_tests.txt" 2>&1; echo "rc=$?" >> "$OUT/amx_tests.txt" ) &
STEP_TAIL=4 step conf_full 190 taskset -c 0-7 python3 -m halserve conformance --backend cuda
grep -c "PASS" "$OUT/conf_full.txt"; grep -E "FAIL|REFUSED" "$OUT/conf_full.txt" | head -20
STEP_TAIL=12 step engine_tier 135 taskset -c 0-7 python3 -m halserve conformance --engine --backend cuda
wait
echo "--- cpu_amx tests on the AMX host"; tail -4 "$OUT/amx_tests.txt"
