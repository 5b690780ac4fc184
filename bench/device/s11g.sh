#!/usr/bin/env bash
# Session 11's GPU stage (<= 330 s; after cpubench.sh: `lead.sh cpubench:245 s11g:330`), issue 20 on this tree:
#   (1) the 1B shape end to end (bf16 and fp8, batch 1 and 64, HF beside; the kernel table of a batch-1
#       step: the captured step against its floor);
#   (2) the cuda conformance, quick op cases;
#   (3) the Triton kernel, fp8 KV-cache and GPU tests with what is left (session 11: 96 s with warm Triton
#       caches, more than the 181 s left here with cold ones: run lead_gputests.sh alone after it).
. "$(dirname "$0")/step.sh"
stage_env
T0=$SECONDS
STEP_TAIL=10 step e2e_1b 120 python3 bench/e2e_decode.py --preset llama-1b --variants bf16,fp8 --batches 1,64 \
    --profile 6 --hf-peer --json "$OUT/e2e_1b.json"
STEP_TAIL=8 step conf_quick 70 python3 -m halserve conformance --backend cuda --quick
left=$((320 - (SECONDS - T0)))
[ "$left" -gt 30 ] && STEP_TAIL=20 step gpu_tests "$left" bash "$(dirname "$0")/lead_gputests.sh"
