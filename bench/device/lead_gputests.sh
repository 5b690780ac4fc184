#!/usr/bin/env bash
# The Triton kernel tests and the cuda backend's GPU tests (batch invariance, graphs) on the GPU.
python3 -m pytest -q -x -p no:cacheprovider tests/hal/test_triton_kernels.py tests/gpu/test_cuda_backend.py 2>&1 | tail -30
