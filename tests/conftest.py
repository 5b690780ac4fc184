"""Shared test setup: `tests.helpers` importable from any test, and tiny checkpoints built
once per session (``checkpoint("qwen3")`` -> path; see tests/helpers/checkpoints.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(arch_or_preset, seed=0, **make_checkpoint_kwargs) -> Path``, cached per session."""
    from tests.helpers.checkpoints import make_checkpoint

    cache: dict = {}

    def get(arch: str, seed: int = 0, **kwargs) -> Path:
        key = (arch, seed, repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = make_checkpoint(arch, tmp_path_factory.mktemp(arch), seed, **kwargs)
        return cache[key]

    return get
