#!/usr/bin/env bash
# cpu_amx on the H200 machine's host CPU (16-core Xeon, AMX): probe, ONEDNN_VERBOSE check of
# the large-M path, conformance + tests per tier. CPU only. At most about 5 minutes; every step has its own
# time limit. The benchmark table is bench/device/cpubench.sh.
#
# Needs (carried by the lead): cffi/pycparser on PYTHONPATH (/tmp/site).
set -u
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-/tmp/site:.}
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= HALSERVE_CACHE_DIR=${HALSERVE_CACHE_DIR:-/tmp/halserve-cache}
T=${THREADS:-16}
step() { echo "== $(date -u +%T) $1"; }

step "cpu facts"
{ lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket|L3"; grep -o -w 'amx_[a-z0-9]*\|avx512_bf16\|avx512_vnni' /proc/cpuinfo | sort | uniq -c; gcc --version | head -1; } > "$OUT/h22_cpu.txt" 2>&1
cat "$OUT/h22_cpu.txt"

step "probe (expect cpu_amx, amx tier, chosen)"
timeout 120 python -m halserve.cli probe > "$OUT/h22_probe.txt" 2>&1; cat "$OUT/h22_probe.txt" | tail -12

step "oneDNN path for large M (bf16 F.linear M=64: look for avx512_core_amx)"
ONEDNN_VERBOSE=1 timeout 60 python - > "$OUT/h22_onednn.txt" 2>&1 <<'PY'
import torch, torch.nn.functional as F
torch.set_num_threads(16)
x, w = torch.randn(64, 2048).bfloat16(), torch.randn(5632, 2048).bfloat16()
for _ in range(2):
    F.linear(x, w)
PY
grep -m3 -o "brg[a-z_:0-9]*amx[a-z_:0-9]*\|avx512_core_amx[a-z_0-9]*" "$OUT/h22_onednn.txt" || echo "no AMX kernel in ONEDNN_VERBOSE (see h22_onednn.txt)"

step "tests: cpu_amx per tier + conformance on the chosen tier"
timeout 150 python -m pytest -q -x tests/hal/test_cpu_amx.py "tests/conformance" -k "cpu_amx" -p no:cacheprovider \
  > "$OUT/h22_tests.txt" 2>&1; echo "rc=$?"; tail -5 "$OUT/h22_tests.txt"

# The benchmarks (1.1B, 8B layer shape, Qwen3-MoE beside llama.cpp and HF) are bench/device/cpubench.sh.
step "done"
