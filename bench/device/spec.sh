#!/usr/bin/env bash
# Speculative decoding on the H200 (<= 150 s): `halserve bench spec` on the Llama-3.1-8B shape
# (bf16, 128-token prompts, 64 new tokens; callable proposer drafting the target's own greedy
# continuation, right with probability alpha; alpha 0.3/0.6/0.8/0.95, k 2/4/8), batch 1 as
# served (graphs, cuBLAS) and batch 16 with plain and speculative engines both in
# batch-invariant mode (so the oracle's continuation is what the verify steps compute: the
# curve's acceptance is the alpha asked for); then the EAGLE-head tests on the cuda backend.
# Run from the repo root: bash bench/device/spec.sh
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1
echo "[spec] $(date -u +%FT%TZ) bench spec, 8B shape, batch 1 + batch 16 batch-invariant (<= 110 s)"
timeout 110 python3 -m halserve.cli bench spec --preset llama-8b --input-len 128 --output-len 64 \
    --batches 1,16 --batch-invariant 16 --no-ngram --json "$OUT/spec_8b.json" 2>&1 | grep -v -i warn | tee "$OUT/spec_bench.log"
echo "[spec] bench rc=${PIPESTATUS[0]} (124 = timed out)"
echo "[spec] $(date -u +%FT%TZ) EAGLE tests on the GPU (<= 35 s)"
timeout 35 python3 -m pytest -q -p no:cacheprovider tests/engine/test_spec_eagle.py \
    -k "random_head or right_position or copies or one_pass or preemption" > "$OUT/spec_eagle_tests.log" 2>&1
echo "[spec] tests rc=$? (124 = timed out)"; tail -5 "$OUT/spec_eagle_tests.log"
echo "[spec] $(date -u +%FT%TZ) done"
