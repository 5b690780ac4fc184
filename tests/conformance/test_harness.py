"""The harness itself: its CLI, report, refusals and statistics (the planted bugs it must
catch are the mutation corpus: mutants.py, test_mutants.py)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from halserve import hal
from halserve.hal import conformance as C
from halserve.hal.interface import OPS, ProbeResult
from halserve.hal.native import NativeBackend

from tests.conformance import mutants


def test_refused_cases_are_reported_not_failed():
    class NoFp8(NativeBackend):
        name = "nofp8"

        def supports(self, op, **spec):
            if str(spec.get("scheme", "")).startswith("fp8"):
                return "refused: no fp8 here"
            return super().supports(op, **spec)

    report = C.run(NoFp8(), ops=["linear"], quick=True)
    refused = [r for r in report.results if r.status == "REFUSED"]
    assert refused and all(r.how == "refused: no fp8 here" for r in refused)
    assert report.ok and report.refused == len(refused)
    assert "refused" in report.summary()


def test_exceptions_are_failures():
    class Raises(NativeBackend):
        name = "raises"

        def silu_and_mul(self, x, out=None):
            raise NotImplementedError("later")

    report = C.run(Raises(), ops=["silu_and_mul"], quick=True)
    assert all(r.status == "FAIL" and "NotImplementedError" in r.detail for r in report.results)


def test_case_table_covers_every_op():
    for quick in (True, False):
        ops = {c.op for c in C.cases(quick=quick)}
        assert ops == set(OPS)
    full = C.cases()
    attn = [c.params for c in full if c.op == "attention"]
    assert {p["Hq"] // p["Hk"] for p in attn} >= {1, 4, 8}
    assert {p["D"] for p in attn} >= {64, 128, 96}
    assert {p["bs"] for p in attn} >= {16, 32}
    assert any(max(C.SCENARIOS[p["scenario"]][0]) >= 4096 for p in attn)
    lin = [c.params for c in full if c.op == "linear"]
    assert {p["M"] for p in lin} >= {1, 7, 33, 257}
    assert {p.get("scheme", "none") for p in lin} >= {"none", "int8", "fp8", "fp8_per_tensor"}
    for c in full:  # every case has a documented threshold
        if c.op in C.OP_CLASS:
            C._limit(c.op, c.params["dtype"], c.params.get("scheme", "none"))
    with pytest.raises(ValueError, match="unknown op"):
        C.cases(ops=["nope"])


def test_chi2_z():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    assert C.chi2_z(torch.tensor([500, 250, 125, 125]), probs) < 0
    assert C.chi2_z(torch.tensor([250, 250, 250, 250]), probs) > 10


def test_perf_mode():
    report = C.run(NativeBackend(), ops=["silu_and_mul", "copy_blocks"], quick=True, perf=True)
    assert report.ok and report.ceilings["copy_GBps"] > 0
    for r in report.results:
        assert r.us > 0 and r.pct is not None and r.bound in ("memory", "compute")
        assert "us" in r.line()


def _cli(capsys, *argv):
    p = argparse.ArgumentParser()
    C.add_arguments(p)
    rc = C.main(p.parse_args(list(argv)))
    return rc, capsys.readouterr().out


def test_cli_report_and_exit_codes(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc, out = _cli(capsys, "--quick", "--backend", "native", "--op", "silu_and_mul,write_kv")
    assert rc == 0
    n = len(C.cases(quick=True, ops=["silu_and_mul", "write_kv"]))
    assert f"native: {n}/{n} passed" in out
    assert all(("PASS" in ln and "native" in ln) for ln in out.splitlines() if ln.startswith("native     "))

    class Broken(mutants.AttentionCausalOffByOne):
        name = "broken_attn"

        @classmethod
        def interpreter_ok(cls):
            return True

    monkeypatch.setattr(hal, "_registered", {"broken_attn": Broken})
    rc, out = _cli(capsys, "--quick", "--backend", "broken_attn", "--op", "attention", "--json")
    data = json.loads(out)
    assert rc == 1 and data[0]["failed"] > 0 and not data[0]["ok"]
    assert data[0]["results"][0]["how"] == "accelerated"
    # not forced: an interpreter-capable backend is run too, alongside native
    assert "broken_attn" in [n for n, _ in C.runnable_backends()]


class TruncatingBf16(NativeBackend):
    """Rounds fp32 -> bf16 toward zero, as the Triton interpreter does, on a coarser grid
    (5 mantissa bits): its error (~64u) sits between the bf16 limit and 4x it."""

    name = "truncating"
    accelerated_ops = frozenset({"silu_and_mul"})

    @classmethod
    def probe(cls):
        return ProbeResult(0, "test double")

    @classmethod
    def interpreter_ok(cls):
        return True

    def silu_and_mul(self, x, out=None):
        i = x.shape[-1] // 2
        y = torch.nn.functional.silu(x[..., :i].float()) * x[..., i:].float()
        if x.dtype == torch.bfloat16:
            y = (y.view(torch.int32) & ~0x3FFFF).view(torch.float32)
        if out is None:
            return y.to(x.dtype)
        out.copy_(y)
        return out


def test_interpreter_bf16_allowance(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bf16 = [r for r in C.run(TruncatingBf16(), ops=["silu_and_mul"], quick=True).results if "bfloat16" in r.case]
    assert bf16 and all(r.status == "FAIL" and r.how == "accelerated" for r in bf16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    report = C.run(TruncatingBf16(), ops=["silu_and_mul"], quick=True)
    assert report.ok and all(r.how == "accelerated (interpreter)" for r in report.results)


def test_cli_engine_tier_reports_and_fails(capsys, monkeypatch):
    from halserve.hal import conformance_engine as E

    seen = []

    def fake(name, on_result=None, **kw):
        seen.append(name)
        res = [E.EngineResult(name, "dense", "float32", "PASS", "tokens", 0, 0),
               E.EngineResult(name, "dense", "bfloat16", "FAIL", "logprob_nmse", 0.1, E.BF16_LOGPROB_NMSE)]
        for r in res:
            on_result(r)
        return res

    monkeypatch.setattr(E, "run_engine", fake)
    rc, out = _cli(capsys, "--engine", "--backend", "native")
    assert rc == 1 and seen == ["native"]
    assert "engine dense  bfloat16  FAIL" in out and "native: engine tier 1/2 passed" in out
    monkeypatch.setenv("HALSERVE_BACKEND", "native")  # honoured when no --backend is given
    _cli(capsys, "--engine")
    assert seen == ["native", "native"]


def test_reduced_mode_only_for_interpreted_backends(monkeypatch):
    monkeypatch.setenv("HALSERVE_CONFORMANCE_REDUCED", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    full = C.run(TruncatingBf16(), ops=["silu_and_mul"], quick=True)
    assert len(full.results) == len(C.cases(quick=True, ops=["silu_and_mul"]))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    small = C.run(TruncatingBf16(), ops=["silu_and_mul"], quick=True)
    assert [r.case for r in small.results] == [c.name for c in C.reduced(C.cases(quick=True, ops=["silu_and_mul"]))]
    assert len(small.results) == 3  # one per dtype
