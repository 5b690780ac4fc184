#!/usr/bin/env bash
# H15b on the H200: the conformance engine tier for cuda (float32 token-exact vs native,
# bfloat16 logprob NMSE), then cuda's quick op cases in both call forms. <= 3 minutes.
# Run: bash bench/device/h15b.sh   (or as a stage: bash bench/device/lead.sh h15b:180)
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
. "$(dirname "$0")/step.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
step engine_cuda 260 python3 -m halserve conformance --engine --backend cuda
step ops_cuda_quick 60 python3 -m halserve conformance --quick --backend cuda
grep -E "FAIL|passed" "$OUT/ops_cuda_quick.txt" | head -40 > "$OUT/summary.txt" 2>/dev/null
grep -E "engine .*(PASS|FAIL)|engine tier" "$OUT/engine_cuda.txt" >> "$OUT/summary.txt" 2>/dev/null
echo "=== summary"; cat "$OUT/summary.txt"
