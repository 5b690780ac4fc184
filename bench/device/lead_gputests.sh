#!/usr/bin/env bash
# The Triton kernel tests, the fp8 KV-cache op tests and every GPU test (cuda backend: batch
# invariance, graphs, skinny and batch-invariant GEMMs; the engine on the GPU). ~150-200 s.
unset TRITON_INTERPRET
python3 -m pytest -q -p no:cacheprovider -rfEx tests/hal/test_triton_kernels.py tests/hal/test_kv_fp8.py tests/gpu 2>&1 | tail -40
