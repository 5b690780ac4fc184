#!/usr/bin/env bash
# Host time of a speculative step on the device machine's own CPU (<= 220 s, no GPU used; the first step may build the cpu_amx library once):
# bench/spec_host.py runs plain decode and speculative decoding with the model's forward
# replaced by a table lookup, so an engine step's time is its host work (scheduling, the
# proposer, staging a verify step, the replay call, lm head + sampling of a few rows,
# acceptance, outputs); process CPU time a step. Batch 1 callable (alpha 0.8, k 4), batch 1
# n-gram, batch 8 callable. These are the host costs that sit between two verify replays on
# the H200 (a speculative step is not overlapped with the device).
# Run from the repo root: bash bench/device/spechost.sh   (logs in $OUT)
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TRANSFORMERS_VERBOSITY=error CUDA_VISIBLE_DEVICES=
. "$(dirname "$0")/step.sh"
step spechost_b1 120 python3 bench/spec_host.py --batch 1 --reps 10
step spechost_b1_ngram 50 python3 bench/spec_host.py --batch 1 --method ngram --reps 10
step spechost_b8 50 python3 bench/spec_host.py --batch 8 --reps 10
echo "--- [$SECONDS s] done"
