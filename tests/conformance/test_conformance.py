"""The HAL conformance suite under pytest: every runnable backend x every quick case.

Full sizes: ``halserve conformance`` (or HALSERVE_CONFORMANCE_FULL=1 here)."""
from __future__ import annotations

import os

import pytest

from halserve import hal
from halserve.hal import conformance as C

FULL = os.environ.get("HALSERVE_CONFORMANCE_FULL") == "1"
BACKENDS = [name for name, _ in C.runnable_backends()]
CASES = C.cases(quick=not FULL)
_instances: dict = {}


def _backend(name):
    if name not in _instances:
        _instances[name] = hal.create(name)
    return _instances[name]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.name.replace(' ', ',')}]")
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_case(backend_name, case):
    res = C.run_case(_backend(backend_name), case)
    if res.status == "REFUSED":
        pytest.skip(res.how)
    assert res.status == "PASS", res.line()


def test_native_is_always_run():
    assert "native" in BACKENDS
