#!/usr/bin/env bash
# Issue 19's 8B throughput figure on the H200: 1000 x (1024 in, 128 out) through LLM.generate as %
# of the workload's floor, HF transformers beside (batch 64), host us per step. <= 190 s.
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
unset TRITON_INTERPRET
STEP_EXT=log STEP_TAIL=12
. "$(dirname "$0")/step.sh"
step thr_8b 185 python3 -m halserve.cli bench throughput --preset llama-8b --variants bf16 --num-prompts 1000 --hf-peer \
  --hf-batch 64 --json "$OUT/thr_8b.json"
