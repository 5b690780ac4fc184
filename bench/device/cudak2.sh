#!/usr/bin/env bash
# CUDAK (issue 20) device stage 2, about 90 s on one H200: the 8B end-to-end decode again with
# each batch size warmed before it is timed (bf16, bf16 batch-invariant, fp8 W8A8; batch 1 and 64):
# the batch-invariant overhead at 64 without the Triton compiles the 15:54 figures carried.
#   OUT=<dir> bash bench/device/cudak2.sh
. "$(dirname "$0")/step.sh"
stage_env
step cudak2_e2e_8b 88 python3 bench/e2e_decode.py --preset llama-8b --variants bf16,bf16-bi,fp8 --batches 64 \
    --json "$OUT/cudak2_e2e_8b.json"
echo "[cudak2] done in ${SECONDS}s"
