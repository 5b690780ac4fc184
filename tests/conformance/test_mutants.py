"""The mutation corpus must FAIL: every planted bug in mutants.py is caught by the quick
cases of the op it breaks (and the report says which case and why)."""
from __future__ import annotations

import pytest

from halserve.hal import conformance as C
from halserve.hal.interface import OPS
from tests.conformance.mutants import MUTANTS


def test_corpus_is_large_and_covers_every_op():
    assert len(MUTANTS) >= 25
    assert {m.op for m in MUTANTS} == set(OPS)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.__name__)
def test_mutant_fails_the_suite(mutant):
    report = C.run(mutant(), ops=[mutant.op], quick=True)
    assert report.results and {r.op for r in report.results} == {mutant.op}
    failed = [r for r in report.results if r.status == "FAIL"]
    assert failed, f"{mutant.__name__} ({mutant.__doc__ or mutant.op}) passed every case:\n" + "\n".join(
        r.line() for r in report.results)
    assert not report.ok
    if mutant.expect:
        assert any(mutant.expect in r.detail for r in failed), "\n".join(r.line() for r in failed)
