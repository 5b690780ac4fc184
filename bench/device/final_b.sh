#!/usr/bin/env bash
# Closing sitting, second call. Cores 0-7: speculative decoding on the GPU (bench/device/spec.sh:
# its GPU tests and the 8B curve). Cores 8-15 meanwhile: cpu_amx's per-op profile with 8 threads
# (bench/device/cpuperf.sh). The 16-thread cpu_amx table (cpubench.sh) runs after, alone. <= 300 s.
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
D="$(dirname "$0")"
( mkdir -p "$OUT/cpuperf"; OUT="$OUT/cpuperf" THREADS=8 CUDA_VISIBLE_DEVICES= timeout -k 5 200 taskset -c 8-15 \
    bash "$D/cpuperf.sh" > "$OUT/cpuperf.log" 2>&1 ) &
mkdir -p "$OUT/spec"; OUT="$OUT/spec" timeout -k 5 285 taskset -c 0-7 bash "$D/spec.sh" > "$OUT/spec.log" 2>&1
echo "spec rc=$?"; tail -40 "$OUT/spec.log"
wait
echo "--- cpuperf (8 threads, cores 8-15)"; tail -30 "$OUT/cpuperf.log"
