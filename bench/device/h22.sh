#!/usr/bin/env bash
# cpu_amx on the H200 machine's host CPU (16-core Xeon, AMX): probe, ONEDNN_VERBOSE check of
# the large-M path, conformance + tests per tier, then `halserve bench cpu` beside llama.cpp
# (AMX build) and HF. CPU only. About 8 minutes; every step has its own time limit.
#
# Needs (carried by the lead): cffi/pycparser on PYTHONPATH (/tmp/site), and for the peer
#   ./.carry/peers/llama.cpp-x86-64-amx.tar.xz and ./.carry/peers/converter.tar.xz
#   (copies of ../shared/peers/llama.cpp/*; without them the llama.cpp rows are skipped).
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

PEER=""
if [ -f .carry/peers/llama.cpp-x86-64-amx.tar.xz ] && [ -f .carry/peers/converter.tar.xz ]; then
  step "unpack llama.cpp (AMX build) + converter"
  PEER=/tmp/h22-llamacpp && mkdir -p $PEER && tar -xJf .carry/peers/llama.cpp-x86-64-amx.tar.xz -C $PEER \
    && tar -xJf .carry/peers/converter.tar.xz -C $PEER || PEER=""
else
  echo "no .carry/peers/ archives: llama.cpp rows skipped"
fi

step "bench cpu: 1.1B (TinyLlama shape), $T threads, bf16 / int8 / int4, 16 sequences"
timeout 240 python -m halserve.cli bench cpu --threads $T --shape 1.1b --quant none,int8,int4 --batch 16 \
  --input-len 128 --output-len 32 ${PEER:+--llama-cpp $PEER} --json "$OUT/h22_bench_1b.json" \
  > "$OUT/h22_bench_1b.txt" 2>&1; echo "rc=$?"; grep "^|\|read bandwidth" "$OUT/h22_bench_1b.txt"

step "bench cpu: 8B shape, batch-1 bf16 vs the read roofline only (a 16 GB GGUF conversion does not fit the budget)"
timeout 150 python -m halserve.cli bench cpu --threads $T --shape 8b --backends cpu_amx --quant none \
  --batch 0 --no-hf --output-len 16 --json "$OUT/h22_bench_8b.json" \
  > "$OUT/h22_bench_8b.txt" 2>&1; echo "rc=$?"; grep "^|\|read bandwidth" "$OUT/h22_bench_8b.txt"
step "done"
