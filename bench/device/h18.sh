#!/usr/bin/env bash
# H18 (rocm) on the H200: the Triton kernels under the CDNA3/CDNA4 configs through conformance
# (a check run: the rocm backend built on the NVIDIA GPU with arch=..., fp8 as e4m3fn, HIP-only
# compile options not applied), the Gluon kernels instantiated with NVIDIA mma layouts against
# float64 references, and the AOT compiles for gfx942/gfx950 with the device's triton (CPU only).
# Usage: bash bench/device/h18.sh   (about 4 minutes; logs and json in $OUT)
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
t0=$SECONDS
STEP_EXT=log
. "$(dirname "$0")/step.sh"
# CPU-only, alongside the GPU steps: AOT compiles with this machine's triton
( CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=0 timeout -k 5 200 python3 -m halserve.hal.rocm.aot --arch gfx942 --arch gfx950 \
    --json "$OUT/aot.json" > "$OUT/aot.log" 2>&1; echo "aot rc=$?" >> "$OUT/aot.log" ) &
aot=$!
step gluon_sm90 60 python3 -m halserve.hal.rocm.gluon_check --arch sm90 --json "$OUT/gluon_sm90.json"
step conf_gfx942 75 python3 -m halserve.hal.rocm.check_on_cuda --arch gfx942 --quick --json "$OUT/conf_gfx942.json"
step conf_gfx950 60 python3 -m halserve.hal.rocm.check_on_cuda --arch gfx950 --quick --json "$OUT/conf_gfx950.json"
step conf_gfx942_bi 45 python3 -m halserve.hal.rocm.check_on_cuda --arch gfx942 --quick --batch-invariant \
  --json "$OUT/conf_gfx942_bi.json"
wait $aot
echo "=== [$((SECONDS - t0))s] aot"; grep -E 'compiled|FAILED|rc=' "$OUT/aot.log" | tail -n 8
echo "=== done in $((SECONDS - t0))s"
