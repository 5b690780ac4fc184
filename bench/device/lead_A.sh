#!/usr/bin/env bash
# Device call A (correctness on the H200): cuda full op conformance, the Triton/GPU pytest,
# the conformance engine tier on cuda, and the rocm kernels under CDNA configs + Gluon checks.
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
. "$(dirname "$0")/step.sh"
( CUDA_VISIBLE_DEVICES= timeout -k 5 200 python3 -m halserve.hal.rocm.aot --arch gfx942 --arch gfx950 \
    --json "$OUT/rocm_aot.json" > "$OUT/rocm_aot.txt" 2>&1; echo "aot rc=$?" >> "$OUT/rocm_aot.txt" ) &
step cuda_conformance_full 190 python3 -m halserve conformance --backend cuda
step gpu_pytest 110 python3 -m pytest -q -x -p no:cacheprovider tests/hal/test_triton_kernels.py tests/gpu
step engine_tier_cuda 110 python3 -m halserve conformance --engine --backend cuda
step rocm_gluon_sm90 50 python3 -m halserve.hal.rocm.gluon_check --arch sm90 --json "$OUT/gluon_sm90.json"
step rocm_conf_gfx942 70 python3 -m halserve.hal.rocm.check_on_cuda --arch gfx942 --quick --json "$OUT/conf_gfx942.json"
wait
tail -n 5 "$OUT/rocm_aot.txt"
grep -E "FAIL|passed" "$OUT/cuda_conformance_full.txt" | tail -20
