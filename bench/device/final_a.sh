#!/usr/bin/env bash
# Closing sitting, first call. Cores 0-7: the GPU checks on the final code (cuda's full
# conformance in both call forms, its engine tier, the Triton/fp8-KV/GPU tests). Cores 8-15
# meanwhile, CPU only: cpu_amx's tests on the AMX host, then the oneDNN primitive-cache cap's
# speed ratio and the memory tests (issue 16). Correctness is never timed here. <= 570 s.
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
unset TRITON_INTERPRET
. "$(dirname "$0")/step.sh"
( export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=8 HALSERVE_CACHE_DIR=/tmp/halserve-cache
  timeout -k 5 300 taskset -c 8-15 python3 -m pytest -q -p no:cacheprovider -rfE tests/hal/test_cpu_amx*.py \
    > "$OUT/amx_tests.txt" 2>&1; echo "rc=$?" >> "$OUT/amx_tests.txt"
  unset ONEDNN_PRIMITIVE_CACHE_CAPACITY LRU_CACHE_CAPACITY
  timeout -k 5 170 taskset -c 8-15 python3 bench/primitive_cache.py --caps 1024,default --rounds 2 \
    --json "$OUT/rss_primitive_cache.json" > "$OUT/rss_primitive_cache.txt" 2>&1
  timeout -k 5 90 taskset -c 8-15 python3 -m pytest -q -p no:cacheprovider -s tests/reliability/test_memory.py \
    -k "primitive or resident" > "$OUT/rss_test_memory.txt" 2>&1; echo "rc=$?" >> "$OUT/rss_test_memory.txt" ) &
STEP_TAIL=4 step conf_full 190 taskset -c 0-7 python3 -m halserve conformance --backend cuda
grep -E "FAIL|REFUSED" "$OUT/conf_full.txt" | head -20
STEP_TAIL=12 step engine_tier 135 taskset -c 0-7 python3 -m halserve conformance --engine --backend cuda
STEP_TAIL=30 step gpu_tests 210 taskset -c 0-7 python3 -m pytest -q -p no:cacheprovider -rfEx \
  tests/hal/test_triton_kernels.py tests/hal/test_kv_fp8.py tests/gpu
wait
echo "--- cpu_amx tests on the AMX host"; tail -6 "$OUT/amx_tests.txt"
echo "--- primitive cache"; tail -8 "$OUT/rss_primitive_cache.txt"; tail -4 "$OUT/rss_test_memory.txt"
