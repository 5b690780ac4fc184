#!/usr/bin/env bash
# Issue 20, "fp8 never slower than bf16 at any batch size from 1 to 256": the 8B end to end at batch 4 and
# 16, bf16 against fp8 (s7g.sh gives 1 and 64, session 7 gave 256; its bf16 batch-16 figure was invalid). Reuses
# the checkpoint s7g.sh leaves: `lead.sh s7g:240 s9g:150`.
. "$(dirname "$0")/step.sh"
stage_env
STEP_TAIL=10 step e2e_8b_b4_b16 ${S9G_S:-140} python3 bench/e2e_decode.py --preset llama-8b --variants bf16,fp8 \
    --batches 4,16 --profile 0 --json "$OUT/e2e_8b_b4_b16.json"
[ "${S7G_KEEP:-0}" = 1 ] || rm -rf /dev/shm/halserve-bench  # S7G_KEEP=1: s10f.sh reuses it
