"""GPU tests: every test here is marked ``gpu`` and skipped when torch sees no CUDA device."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available() and not os.environ.get("HALSERVE_GPU_TEST_DEVICE"):
                item.add_marker(skip)
