#!/usr/bin/env bash
# H19 on the H200: issue 19's end-to-end numbers through LLM.generate, HF transformers beside.
#  - batch-1 decode of the Llama-1B and -8B shapes as % of the read-bandwidth roofline
#    (bench/e2e_decode.py: (1024 in + 128 out) - (1024 in + 1 out), median of 3)
#  - 1000 x (1024 in, 128 out) on the 1B shape and 400 x on the 8B shape (fewer, to fit the
#    time) as % of the workload's floor (halserve bench throughput: prefill FLOPs at the
#    measured GEMM peak + decode steps at max(FLOP, byte) time), with host us per step
# Usage: bash bench/device/h19.sh   (at most 8 minutes; logs and json in $OUT)
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
t0=$SECONDS
STEP_EXT=log
. "$(dirname "$0")/step.sh"
step e2e_1b 100 python3 bench/e2e_decode.py --preset llama-1b --variants bf16 --batch 8 --hf-peer \
  --json "$OUT/e2e_1b.json"
step thr_1b 100 python3 -m halserve.cli bench throughput --preset llama-1b --variants bf16 --num-prompts 1000 --hf-peer \
  --hf-batch 64 --json "$OUT/thr_1b.json"
step e2e_8b 140 python3 bench/e2e_decode.py --preset llama-8b --variants bf16 --batch 8 --hf-peer \
  --json "$OUT/e2e_8b.json"
step thr_8b 130 python3 -m halserve.cli bench throughput --preset llama-8b --variants bf16 --num-prompts 400 --hf-peer \
  --hf-batch 32 --json "$OUT/thr_8b.json"
echo "=== done in $((SECONDS - t0))s"
