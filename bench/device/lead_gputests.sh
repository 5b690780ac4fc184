#!/usr/bin/env bash
# The Triton kernel tests and every GPU test (cuda backend: batch invariance, graphs; the engine on the GPU).
python3 -m pytest -q -p no:cacheprovider tests/hal/test_triton_kernels.py tests/gpu 2>&1 | tail -30
