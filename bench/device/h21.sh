#!/usr/bin/env bash
# H21, speculative decoding on the H200 (about 5 minutes): the lossless tests on the cuda
# backend, then `halserve bench spec` on the Llama-3.1-8B shape (bf16; alpha 0.3..0.95,
# k 2/4/8, batch 1 and 16, against plain decode in the same process) and n-gram on the demo
# model completing and editing Python. Run from the repo root: bash bench/device/h21.sh
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1
echo "[h21] $(date -u +%FT%TZ) lossless tests on the GPU (<= 100 s)"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/engine/test_spec_decode.py \
    -k "greedy_identical and (llama or qwen3 or mixtral) or seeded or draft_model or follows_the_target or preemption or stops" \
    > "$OUT/h21_tests.log" 2>&1
echo "[h21] tests rc=$? (124 = timed out)"; tail -5 "$OUT/h21_tests.log"
echo "[h21] $(date -u +%FT%TZ) bench spec, 8B shape (<= 190 s)"
timeout 190 python3 -m halserve.cli bench spec --preset llama-8b --input-len 128 --output-len 64 --ngram-tokens 96 \
    --json "$OUT/h21_spec_8b.json" 2>&1 | grep -v -i warn | tee "$OUT/h21_bench.log"
echo "[h21] bench rc=${PIPESTATUS[0]}; $(date -u +%FT%TZ) done"
