"""Where a Triton kernel test runs: the GPU when there is one, else the interpreter. Import it
before anything from halserve.hal.triton (TRITON_INTERPRET is read when the kernels are first
decorated); without triton installed it skips the importing test module."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
DEV = "cuda" if ON_GPU else "cpu"
