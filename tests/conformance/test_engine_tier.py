"""The engine tier: whole models on each runnable backend vs native (token-exact in float32,
logprob NMSE in bfloat16), and proof that it catches bugs that break composition.

Interpreter-bound backends (Triton under TRITON_INTERPRET=1) run the dense model in float32
only, unless HALSERVE_CONFORMANCE_FULL=1."""
from __future__ import annotations

import os

import pytest

from halserve import hal
from halserve.hal import conformance as C
from halserve.hal import conformance_engine as E
from tests.conformance import mutants

FULL = os.environ.get("HALSERVE_CONFORMANCE_FULL") == "1"
BACKENDS = [name for name, _ in C.runnable_backends()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine_tier")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_engine_tier(backend_name, workdir):
    backend = hal.create(backend_name)
    reduced = C.interpreted(backend) and not FULL
    results = E.run_engine(backend, models=("dense",) if reduced else E.MODELS,
                           dtypes=("float32",) if reduced else E.DTYPES, workdir=workdir)
    assert results and all(r.status == "PASS" for r in results), "\n".join(r.line() for r in results)


@pytest.mark.parametrize("mutant", [mutants.SiluHalvesSwappedWithoutOut, mutants.AttentionCausalOffByOne,
                                    mutants.WriteKvSlotOffByOne], ids=lambda m: m.__name__)
def test_engine_tier_catches_broken_composition(mutant, workdir):
    results = E.run_engine(mutant(), models=("dense",), workdir=workdir)
    assert [r.status for r in results] == ["FAIL", "FAIL"], "\n".join(r.line() for r in results)
    assert results[1].metric == "logprob_nmse" and results[1].value > E.BF16_LOGPROB_NMSE
