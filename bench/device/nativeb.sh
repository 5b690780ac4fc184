#!/usr/bin/env bash
# Issue 22, native's batched decode beside HF on the AMX host (16-core Xeon), CPU only.
# 1. `halserve bench cpu` with the batched figure interleaved (the default now: native, cpu_amx
#    and HF loaded at once, one decode step of each in turn, rate = n / median step; all
#    prompts prefilled in one step), 16 / 32 / 64 sequences of 128-token prompts, 16 threads;
# 2. the 32-sequence figure the old way (--batch-mode sequential: each engine's own run, one
#    after another), to see how far the two ways differ on a quiet host.
# Run from the repo root: bash bench/device/nativeb.sh (about 5 minutes; the limits add up to 8.5)
. "$(dirname "$0")/step.sh"; cpu_stage_env
STEP_TAIL=24
step nativeb_interleaved 330 python3 -m halserve bench cpu --threads "$T" --shape 1.1b --backends native,cpu_amx \
  --quant none --input-len 16 --output-len 8 --batch 16,32,64 --batch-input-len 128 --batch-output-len 16 \
  --json "$OUT/nativeb_interleaved.json"
step nativeb_sequential 180 python3 -m halserve bench cpu --threads "$T" --shape 1.1b --backends native,cpu_amx \
  --quant none --input-len 16 --output-len 8 --batch 32 --batch-input-len 128 --batch-output-len 16 \
  --batch-mode sequential --json "$OUT/nativeb_sequential.json"
