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
