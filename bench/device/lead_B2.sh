#!/usr/bin/env bash
# Device call B2: the engine tier on cuda after its fix, the GPU tests A did not reach, cpu_amx on
# the AMX host beside llama.cpp and HF (CPU only), and the 1B end-to-end decode.
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TRANSFORMERS_VERBOSITY=error HALSERVE_CACHE_DIR=/tmp/halserve-cache
unset TRITON_INTERPRET
. "$(dirname "$0")/step.sh"
step engine_tier_cuda 75 python3 -m halserve conformance --engine --backend cuda
step gpu_tests_rest 60 python3 -m pytest -q -p no:cacheprovider tests/gpu -k "pin_host or engine_gpu or graph"
PEER=$(peer_llamacpp /tmp/llamacpp)
export CUDA_VISIBLE_DEVICES=
step amx_probe 20 python3 -m halserve probe
step amx_tests 60 python3 -m pytest -q -x -p no:cacheprovider tests/hal/test_cpu_amx.py
step amx_bench_1b 200 python3 -m halserve.cli bench cpu --threads 16 --shape 1.1b --quant none,int8,int4 --batch 16 \
  --input-len 128 --output-len 32 ${PEER:+--llama-cpp $PEER} --json "$OUT/amx_bench_1b.json"
unset CUDA_VISIBLE_DEVICES
step e2e_1b 60 python3 bench/e2e_decode.py --preset llama-1b --variants bf16 --batch 64 --json "$OUT/e2e_1b.json"
