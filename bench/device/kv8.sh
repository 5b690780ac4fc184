#!/usr/bin/env bash
# KV8 on the H200: the fp8 (e4m3) KV cache (issue 16, docs/kv_cache_fp8.md).
#  - conformance of write_kv and attention on cuda, quick cases (the fp8-cache ones carry kv=fp8)
#  - the fp8 tests of this repo on the GPU backend (cuda is picked by probe): ops against the
#    float64 reference, engine auto vs fp8 greedy agreement and logprob NMSE, block bytes
#  - halserve generate --kv-cache-dtype fp8 on the demo model (CUDA graphs on)
#  - decode speed through the CUDA-graph engine, Llama-8B shape with 4 layers (a quick
#    checkpoint), auto vs fp8 cache: b1 ms/token (% of the read roofline, KV bytes counted at
#    the cache's size) and b64 tok/s
#  - kv8_cause: the earlier fp32-add-then-cvt store against torch's rule, split into the add
#    trick and the cvt, next to the integer encoder the kernel uses now (why it mismatched)
# Usage: bash bench/device/kv8.sh   (about 3-4 min, at most 270 s of step limits; logs in $OUT)
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
t0=$SECONDS
. "$(dirname "$0")/step.sh"
STEP_TAIL=12 step conf_kv 60 python3 -m halserve.cli conformance --backend cuda --op write_kv,attention --quick
grep -E "kv=fp8|passed" "$OUT/conf_kv.txt" | head -12
step tests_kv 90 python3 -m pytest -q -p no:cacheprovider tests/hal/test_kv_fp8.py tests/engine/test_kv_fp8.py \
  -k "not server and not cli and not offload and not bad_checkpoint"
step gen_fp8 45 python3 -m halserve.cli generate --kv-cache-dtype fp8 --max-num-seqs 4 --kv-cache-memory 1 --max-tokens 32 \
  --prompt "The capital of France is"
step e2e_kv8 60 python3 bench/e2e_decode.py --preset llama-8b --num-layers 4 --variants bf16 --kv-cache-dtype auto,fp8 \
  --input-len 1024 --output-len 64 --batch 64 --json "$OUT/e2e_kv8.json"
step kv8_cause 15 python3 bench/device/kv8_cause.py
echo "=== done in $((SECONDS - t0))s"
