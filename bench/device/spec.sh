#!/usr/bin/env bash
# Speculative decoding on the H200 (<= 300 s): `halserve bench spec` on the Llama-3.1-8B shape
# (bf16, 128-token prompts, 64 new tokens; a callable proposer drafting the target's own
# greedy continuation, each token right with probability alpha; alpha 0.3/0.6/0.8/0.95,
# k 2/4/8): batch 1 and 16 as served (graphs, cuBLAS: the configuration users run), then
# batch 16 with the plain and the speculative engine both in batch-invariant mode. Verify
# steps of decoding rows now replay graphs bucketed by batch size (b rows x (k+1) token slots,
# engine/spec/verify_graph.py); each row says how many steps did ("N/M steps in verify
# graphs"). The oracle's continuation is the speculative engine's own (an untimed run at each
# k); rows whose timed greedy path left it are printed ("rows left the oracle's path").
# Then n-gram's acceptance and speed-up on the demo model completing Python from the stdlib.
# The lossless tests on the GPU are bench/device/spectests.sh.
# Run from the repo root: bash bench/device/spec.sh   (logs and spec_8b.json in $OUT)
. "$(dirname "$0")/step.sh"
stage_env
STEP_TAIL=70 step spec_bench_8b 230 python3 -m halserve.cli bench spec --preset llama-8b --input-len 128 \
    --output-len 64 --batches 1,16 --batch-invariant 16 --json "$OUT/spec_8b.json"
echo "--- [$SECONDS s] done"
