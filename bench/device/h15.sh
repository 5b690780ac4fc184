#!/usr/bin/env bash
# H15a on the H200: the full cuda op conformance (every case, both call forms, through the
# supports() dispatcher, with the accelerated/native column) and the GPU pytest (Triton
# kernels + tests/gpu). <= 6 minutes. Run from the repo root: bash bench/device/h15.sh
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
. "$(dirname "$0")/step.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
step probe 30 python3 -m halserve probe
step ops_cuda_full 190 python3 -m halserve conformance --backend cuda
step gpu_pytest 140 python3 -m pytest -q -x -p no:cacheprovider tests/hal/test_triton_kernels.py tests/gpu
{ grep -E "FAIL|->|passed" "$OUT/ops_cuda_full.txt" | head -60
  grep -cE "native fallback" "$OUT/ops_cuda_full.txt" | sed 's/^/native-fallback cases: /'
  tail -n 3 "$OUT/gpu_pytest.txt"; } > "$OUT/summary.txt" 2>/dev/null
echo "=== summary"; cat "$OUT/summary.txt"
