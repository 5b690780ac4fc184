#!/usr/bin/env bash
# Session 5's closing check on the final code (the plan for the next session lent a device): correctness only, never timed, so the four lanes share
# the host and the one GPU (about 140 GB of memory; each lane's models are small):
#   cores 0-3:   cuda's full conformance (both call forms), then its engine tier;
#   cores 4-7:   the Triton-kernel, fused-op, batch-invariant attention, fp8-KV and GPU tests (tests/gpu,
#                incl. the chunk-invariance engine test on cuda);
#   cores 8-11:  the speculative-decoding test files whole on the cuda backend (bench/device/spectests.sh);
#   cores 12-15: cpu_amx's tests and the chunk-invariance engine test on the AMX host
#                (CUDA_VISIBLE_DEVICES=), then its quick conformance.
# <= 420 s. Logs in $OUT/<lane>.txt.
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
unset TRITON_INTERPRET
D="$(dirname "$0")"
lane() {  # lane NAME CORES SECONDS CMD...: one lane's command under its limit, pinned, logged
  local name=$1 cores=$2 lim=$3; shift 3
  { echo "[$name] start $(date -u +%T)"; timeout -k 5 "$lim" taskset -c "$cores" "$@"; echo "[$name] rc=$? $(date -u +%T)"; } \
    > "$OUT/$name.txt" 2>&1
}
( lane conf_full 0-3 230 python3 -m halserve conformance --backend cuda
  lane engine_tier 0-3 160 python3 -m halserve conformance --engine --backend cuda ) &
( OMP_NUM_THREADS=4 lane gpu_tests 4-7 400 python3 -m pytest -q -p no:cacheprovider -rfEs \
    tests/hal/test_triton_kernels.py tests/hal/test_kv_fp8.py tests/hal/test_triton_fused.py \
    tests/hal/test_bi_attention.py tests/gpu ) &
( mkdir -p "$OUT/spec"; OMP_NUM_THREADS=4 OUT="$OUT/spec" lane spec_tests 8-11 330 bash "$D/spectests.sh" ) &
( export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4 HALSERVE_CACHE_DIR=/tmp/halserve-cache
  lane amx_tests 12-15 300 python3 -m pytest -q -p no:cacheprovider -rfEs tests/hal/test_cpu_amx*.py \
    tests/engine/test_bi_chunking.py
  lane amx_conf 12-15 100 python3 -m halserve conformance --backend cpu_amx --quick ) &
wait
for f in conf_full engine_tier gpu_tests spec_tests amx_tests amx_conf; do
  echo "=== $f"; grep -v -i 'it/s\]\|warn' "$OUT/$f.txt" | tail -n 12
done
tail -n 30 "$OUT/spec/spec_tests.txt" 2>/dev/null
