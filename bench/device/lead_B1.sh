#!/usr/bin/env bash
# Device call B1: the conformance engine tier on cuda and the GPU tests again (after A's two
# findings), speculative decoding on the GPU, and the 8B end-to-end decode.
. "$(dirname "$0")/step.sh"
stage_env
step engine_tier_cuda 90 python3 -m halserve conformance --engine --backend cuda
step gpu_tests 75 python3 -m pytest -q -p no:cacheprovider tests/gpu
step spec_tests 70 python3 -m pytest -q -p no:cacheprovider tests/engine/test_spec_decode.py \
    -k "greedy_identical and (llama or qwen3 or mixtral) or seeded or draft_model or follows_the_target"
step spec_bench_8b 130 python3 -m halserve.cli bench spec --preset llama-8b --input-len 128 --output-len 64 \
    --json "$OUT/spec_8b.json"
step e2e_8b 110 python3 bench/e2e_decode.py --preset llama-8b --variants bf16,bf16-bi,fp8 --batch 64 --hf-peer \
    --json "$OUT/e2e_8b.json"
