"""The suite's own guarantees: every op argument is varied by a case, the thresholds keep a
10x margin over native, and the report's accelerated column is true."""
from __future__ import annotations

import collections

import pytest

from halserve.hal import conformance as C

from halserve.hal.native import NativeBackend
from tests.conformance import mutants


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_op_argument_is_varied(quick):
    assert C.coverage_gaps(quick=quick) == []


def test_meta_test_catches_a_new_untested_argument(monkeypatch):
    real = C.op_arguments
    monkeypatch.setattr(C, "op_arguments", lambda op: real(op) + (["new_knob"] if op == "rms_norm" else []))
    assert C.coverage_gaps() == ["rms_norm.new_knob: no entry in COVERAGE"]


def test_meta_test_catches_an_argument_never_varied(monkeypatch):
    real = C.cases

    def one_eps(quick=False, ops=None):
        table = real(quick=quick, ops=ops)
        for c in table:
            if c.op == "rms_norm":
                c.params["eps"] = 1e-6
        return table

    monkeypatch.setattr(C, "cases", one_eps)
    assert any(g.startswith("rms_norm.eps: eps takes one value") for g in C.coverage_gaps())


def test_op_arguments_read_the_contract():
    args = C.op_arguments("attention")
    assert {"q", "kv_cache", "scale", "out", "meta.sliding_window", "meta.block_tables"} <= set(args)
    assert "spec.correction_bias" in C.op_arguments("moe") and "w13.scale" in C.op_arguments("moe")
    assert "params.seeds" in C.op_arguments("sample")


def test_native_sits_10x_under_every_limit():
    worst: dict = collections.defaultdict(float)
    native = NativeBackend()
    for case in C.cases(quick=True):
        res = C.run_case(native, case)
        assert res.status == "PASS", res.line()
        if res.metric == "nmse":
            worst[(case.op, case.params["dtype"], case.params.get("scheme", "none"))] = max(
                worst[(case.op, case.params["dtype"], case.params.get("scheme", "none"))], res.value)
    assert {op for op, _, _ in worst} == {"linear", "rms_norm", "rotary", "silu_and_mul", "rotary_write_kv",
                                         "attention", "moe"}
    for (op, dtype, scheme), value in worst.items():
        assert value * 10 <= C._limit(op, dtype, scheme), (op, dtype, scheme, value)


def test_hidden_fallback_is_caught_and_honest_fallback_is_not():
    report = C.run(mutants.HiddenFallback(), ops=["silu_and_mul"], quick=True)
    assert all(r.status == "FAIL" and "hidden fallback" in r.detail for r in report.results)

    class Honest(NativeBackend):  # overrides nothing: every op is an honest native fallback
        name = "honest"

    report = C.run(Honest(), ops=["silu_and_mul", "rms_norm"], quick=True)
    assert report.ok and all(r.how == "native fallback" for r in report.results)

