#!/usr/bin/env bash
# Session 5's bench sitting (one call, <= 585 s; the plan for the next session lent a device), two pinned
# lanes side by side:
#   GPU lane, cores 0-3:  fp8.sh (skinny forms + 8B fp8/bf16 end to end), spec.sh (the speculative curve,
#                         decode-alone ratios, n-gram), biatt.sh (batch-invariant 8B end to end, now with
#                         every row on the decode tile);
#   CPU lane, cores 4-15: THREADS=12 (llama.cpp and HF at the same 12 threads in the same sitting):
#                         cpubench.sh (issue 22's table), amxb.sh (16/64-row steps beside HF, before/after),
#                         amxq.sh (int8/int4 GEMV A/B: huge pages, chunked rows).
# s5final.sh checks correctness on the same code; s5extra.sh holds what did not fit.
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
  run_lane 4-15 575 cpubench:250 amxb:140 amxq:150 ) &
run_lane 0-3 575 fp8:200 spec:210 biatt:165
wait
for s in fp8 spec biatt cpubench amxb amxq; do
  echo "=================== $s"; grep -v -i 'it/s\]\|graph/s\]\|warn' "$OUT/$s.log" 2>/dev/null | tail -n 30
done
