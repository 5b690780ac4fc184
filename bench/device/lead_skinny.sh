#!/usr/bin/env bash
# The split-K weight-streaming GEMM against cuBLAS / the old fp8 path / the batch-invariant matmul.
python3 bench/skinny_gemm.py --json "$OUT/skinny.json"
