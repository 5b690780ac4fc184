# Sourced by the device stage scripts: `step NAME SECONDS CMD...` runs CMD with a time limit,
# logs it to $OUT/NAME.$STEP_EXT (default txt) and prints its rc and last lines (progress bars
# and warnings left out); a failing step never stops the ones after it.
step() {
  local name=$1 lim=$2 log
  shift 2
  log="$OUT/$name.${STEP_EXT:-txt}"
  echo "--- [$SECONDS s] $name (limit ${lim}s)"
  timeout -k 5 "$lim" "$@" > "$log" 2>&1
  echo "--- [$SECONDS s] $name rc=$?"
  grep -v -i 'it/s\]\|graph/s\]\|warn\|nanobind\|^ - ' "$log" | tail -n "${STEP_TAIL:-16}"
}

# The GPU stages' common set-up (`. step.sh; stage_env`): strict mode, $OUT made, this tree on
# PYTHONPATH, offline, no Triton interpreter.
stage_env() {
  set -uo pipefail
  OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    TRANSFORMERS_VERBOSITY=error
  unset TRITON_INTERPRET
}

# The CPU-only stages' set-up (`. step.sh; cpu_stage_env`): stage_env, no GPU, the C build cache,
# and T = THREADS (default 16, the AMX host's cores).
cpu_stage_env() {
  stage_env
  export HALSERVE_CACHE_DIR=${HALSERVE_CACHE_DIR:-/tmp/halserve-cache} CUDA_VISIBLE_DEVICES=
  T=${THREADS:-16}
}

# The sittings' lanes (`. step.sh; T0=$SECONDS; run_lane CORES DEADLINE "stage:limit" ...`): each
# stage bench/device/<stage>.sh pinned to CORES, under the smaller of its limit and what is left of
# the lane's DEADLINE (seconds after T0), logged to $OUT/<stage>.log with its own $OUT/<stage>/.
run_lane() {
  local cores=$1 deadline=$2 d s lim left spec
  d="$(dirname "${BASH_SOURCE[0]}")"
  shift 2
  for spec in "$@"; do
    s=${spec%%:*} lim=${spec#*:}
    left=$((deadline - (SECONDS - T0)))
    [ "$left" -lt "$lim" ] && lim=$left
    if [ "$lim" -lt 20 ]; then echo "[$s] skipped: no time left" > "$OUT/$s.log"; continue; fi
    mkdir -p "$OUT/$s"
    echo "[$s] start +$((SECONDS - T0))s limit ${lim}s" > "$OUT/$s.log"
    OUT="$OUT/$s" timeout -k 5 "$lim" taskset -c "$cores" bash "$d/$s.sh" >> "$OUT/$s.log" 2>&1
    echo "[$s] rc=$? at +$((SECONDS - T0))s" >> "$OUT/$s.log"
  done
}

# The sittings' CPU lane (`cpu_lane DEADLINE "stage:limit" ...`, in the background; `wait` for it):
# cores 4-15 at 12 threads (llama.cpp and HF at the same 12 in its stages), no GPU, its own C build
# cache, beside GPU lanes on cores 0-3.
cpu_lane() {
  ( export THREADS=12 OMP_NUM_THREADS=12 CUDA_VISIBLE_DEVICES= HALSERVE_CACHE_DIR=/tmp/halserve-cache-cpu
    run_lane 4-15 "$@" ) &
}

# show_lanes STAGE...: each stage log's last lines, progress bars and warnings left out
show_lanes() {
  local s
  for s in "$@"; do
    echo "=================== $s"; grep -v -i 'it/s\]\|graph/s\]\|warn' "$OUT/$s.log" 2>/dev/null | tail -n 30
  done
}

# The carried llama.cpp peer (`PEER=$(peer_llamacpp DIR)`): its AMX build and GGUF converter extracted
# into DIR; prints DIR, or nothing where the archives are missing (the bench then runs without it).
peer_llamacpp() {
  [ -f .carry/peers/llama.cpp-x86-64-amx.tar.xz ] && [ -f .carry/peers/converter.tar.xz ] && mkdir -p "$1" \
    && tar -xJf .carry/peers/llama.cpp-x86-64-amx.tar.xz -C "$1" && tar -xJf .carry/peers/converter.tar.xz -C "$1" \
    && echo "$1"
}
