#!/usr/bin/env bash
# Session 4's bench sitting (one call, <= 585 s), two pinned lanes side by side:
#   GPU lane, cores 0-3:  bench/device/fp8.sh (sweep of the new skinny forms + 8B fp8/bf16 end to end;
#                         its GPU tests run in s4final.sh), biatt.sh (batch-invariant 8B end to end
#                         + GEMM forms), spec.sh (the speculative curve and n-gram);
#   CPU lane, cores 4-15: THREADS=12 (llama.cpp and HF at the same 12 threads in the same sitting):
#                         cpubench.sh (issue 22's table), amxmoe.sh, cpugraph.sh, amxb.sh.
# Each script runs under what is left of its lane's deadline. Logs in $OUT/<script>.log.
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
D="$(dirname "$0")"
T0=$SECONDS
run_lane() {  # run_lane CORES DEADLINE_S "script:limit" ...
  local cores=$1 deadline=$2; shift 2
  for spec in "$@"; do
    local s=${spec%%:*} lim=${spec#*:} left
    left=$((deadline - (SECONDS - T0)))
    [ "$left" -lt "$lim" ] && lim=$left
    if [ "$lim" -lt 20 ]; then echo "[$s] skipped: no time left" > "$OUT/$s.log"; continue; fi
    mkdir -p "$OUT/$s"
    echo "[$s] start +$((SECONDS - T0))s limit ${lim}s" > "$OUT/$s.log"
    OUT="$OUT/$s" timeout -k 5 "$lim" taskset -c "$cores" bash "$D/$s.sh" >> "$OUT/$s.log" 2>&1
    echo "[$s] rc=$? at +$((SECONDS - T0))s" >> "$OUT/$s.log"
  done
}
( export THREADS=12 OMP_NUM_THREADS=12 CUDA_VISIBLE_DEVICES= HALSERVE_CACHE_DIR=/tmp/halserve-cache-cpu
  run_lane 4-15 575 cpubench:250 amxmoe:120 cpugraph:100 amxb:110 ) &
run_lane 0-3 575 fp8:225 biatt:195 spec:150
wait
for s in fp8 biatt spec cpubench amxmoe cpugraph amxb; do
  echo "=================== $s"; grep -v -i 'it/s\]\|graph/s\]\|warn' "$OUT/$s.log" 2>/dev/null | tail -n 30
done
