"""The HAL conformance suite under pytest: every runnable backend x every quick case.

Full sizes: ``halserve conformance`` (or HALSERVE_CONFORMANCE_FULL=1 here). Backends whose
kernels run in the Triton interpreter (or another slow emulation: ``interpreted()``) may run a
reduced subset with HALSERVE_CONFORMANCE_REDUCED=1: the first quick case of each op and dtype."""
from __future__ import annotations

import os

import pytest

from halserve import hal
from halserve.hal import conformance as C

FULL = os.environ.get("HALSERVE_CONFORMANCE_FULL") == "1"
REDUCED = os.environ.get("HALSERVE_CONFORMANCE_REDUCED") == "1"
BACKENDS = [name for name, _ in C.runnable_backends()]
CASES = C.cases(quick=not FULL)
_instances: dict = {}


def _backend(name):
    if name not in _instances:
        _instances[name] = hal.create(name)
    return _instances[name]


_REDUCED_SET = {id(c) for c in C.reduced(CASES)}


def _first_of_kind(case) -> bool:
    return id(case) in _REDUCED_SET


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.name.replace(' ', ',')}]")
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_case(backend_name, case):
    backend = _backend(backend_name)
    if REDUCED and C.interpreted(backend) and not _first_of_kind(case):
        pytest.skip("HALSERVE_CONFORMANCE_REDUCED=1: interpreted backends run one case per op and dtype")
    res = C.run_case(backend, case)
    if res.status == "REFUSED":
        pytest.skip(res.how)
    assert res.status == "PASS", res.line()


def test_native_is_always_run():
    assert "native" in BACKENDS
