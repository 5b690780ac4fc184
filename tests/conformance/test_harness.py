"""The harness itself: it must catch planted bugs, and its CLI, report and statistics work."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from halserve import hal
from halserve.hal import conformance as C
from halserve.hal.interface import OPS, AttentionMetadata, ProbeResult
from halserve.hal.native import NativeBackend


class Planted(NativeBackend):
    """A native backend with one deliberate bug; it claims the buggy op as accelerated."""

    name = "planted"

    @classmethod
    def probe(cls):
        return ProbeResult(0, "test double")


class AttentionRelError(Planted):
    accelerated_ops = frozenset({"attention"})

    def attention(self, q, kv_cache, meta, scale, out=None):
        out = super().attention(q, kv_cache, meta, scale, out=out)
        return out.mul_(1 + 1e-3)


class AttentionOffByOneBlock(Planted):
    accelerated_ops = frozenset({"attention"})

    def attention(self, q, kv_cache, meta, scale, out=None):
        shifted = torch.cat([meta.block_tables[:, 1:], torch.zeros_like(meta.block_tables[:, :1])], dim=1)
        bad = AttentionMetadata(meta.cu_seqlens_q, meta.seq_lens, shifted, meta.slot_mapping,
                                meta.max_seqlen_q, meta.max_seqlen_k, meta.query_lens_host,
                                meta.seq_lens_host, meta.block_size, meta.num_decode_seqs, meta.sliding_window)
        return super().attention(q, kv_cache, bad, scale, out=out)


class AttentionWritesPastOut(Planted):
    accelerated_ops = frozenset({"attention"})

    def attention(self, q, kv_cache, meta, scale, out=None):
        out = super().attention(q, kv_cache, meta, scale, out=out)
        spill = torch.as_strided(out, (out.numel() + 1,), (1,), out.storage_offset())
        spill[-1] = 0.0
        return out


def _attention_results(backend):
    report = C.run(backend, ops=["attention"], quick=True)
    assert report.results and all(r.op == "attention" for r in report.results)
    assert not report.ok
    return report.results


def test_catches_relative_error_in_attention():
    results = _attention_results(AttentionRelError())
    fp32 = [r for r in results if "dtype=float32" in r.case]
    assert fp32 and all(r.status == "FAIL" for r in fp32)
    assert all(r.how == "accelerated" for r in results)


def test_catches_off_by_one_block_table_read():
    results = _attention_results(AttentionOffByOneBlock())
    assert all(r.status == "FAIL" for r in results)


def test_catches_write_outside_out():
    results = _attention_results(AttentionWritesPastOut())
    assert all(r.status == "FAIL" and "past the end of out" in r.detail for r in results)


class WriteKvWritesPadding(Planted):
    def write_kv(self, key, value, kv_cache, slot_mapping):
        flat_k = kv_cache[0].view(-1, *kv_cache.shape[-2:])
        flat_v = kv_cache[1].view(-1, *kv_cache.shape[-2:])
        for t, s in enumerate(slot_mapping.tolist()):  # slot -1 lands on the last slot
            flat_k[s], flat_v[s] = key[t], value[t]


class SampleIgnoresTopK(Planted):
    def sample(self, logits, params, out=None):
        from dataclasses import replace
        return super().sample(logits, replace(params, top_k=torch.zeros_like(params.top_k), no_top_k=True), out=out)


class SampleWrongTemperature(Planted):
    def sample(self, logits, params, out=None):
        from dataclasses import replace
        return super().sample(logits, replace(params, temperature=params.temperature * 1.5), out=out)


class SwapOnlyKeys(Planted):
    def swap_blocks(self, src, dst, block_mapping):
        for i, j in block_mapping.tolist():
            dst[0, j] = src[0, i]


class LinearNoBias(Planted):
    def linear(self, x, w, bias=None, out=None):
        return super().linear(x, w, None, out=out)


class Fp8WeightOnly(Planted):
    """Skips the activation quantization of W8A8: a plausible, subtle bug."""

    def linear(self, x, w, bias=None, out=None):
        from dataclasses import replace
        if w.scheme == "fp8":
            w = replace(w, act_scheme="none")
        return super().linear(x, w, bias, out=out)


class MoeNoRenormalize(Planted):
    def moe(self, x, router_logits, w13, w2, spec, out=None):
        from dataclasses import replace
        return super().moe(x, router_logits, w13, w2, replace(spec, renormalize=False), out=out)


class RmsNormWrongResidual(Planted):
    def rms_norm(self, x, weight, eps, residual=None, out=None):
        if residual is None:
            return super().rms_norm(x, weight, eps, out=out)
        y, h = super().rms_norm(x, weight, eps, residual=residual, out=out)
        return y, x.clone()


class RotaryWrongStyle(Planted):
    def rotary(self, positions, q, k, cos_sin_cache, is_neox=True):
        super().rotary(positions, q, k, cos_sin_cache, not is_neox)


@pytest.mark.parametrize("planted,op,case_filter", [
    (WriteKvWritesPadding, "write_kv", None),
    (SampleIgnoresTopK, "sample", "kind=top_k"),
    (SampleWrongTemperature, "sample", "kind=top_p"),
    (SwapOnlyKeys, "swap_blocks", None),
    (LinearNoBias, "linear", "bias=True"),
    (Fp8WeightOnly, "linear", "scheme=fp8 "),
    (MoeNoRenormalize, "moe", None),
    (RmsNormWrongResidual, "rms_norm", "fused=True"),
    (RotaryWrongStyle, "rotary", None),
])
def test_catches_other_planted_bugs(planted, op, case_filter):
    report = C.run(planted(), ops=[op], quick=True)
    hits = [r for r in report.results if case_filter is None or case_filter in r.case + " "]
    assert hits and all(r.status == "FAIL" for r in hits), "\n".join(r.line() for r in hits)
    assert all(r.how == "native fallback" for r in report.results)


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
    assert "native: 6/6 passed" in out
    assert all(("PASS" in ln and "native" in ln) for ln in out.splitlines() if ln.startswith("native     "))

    class Broken(AttentionWritesPastOut):
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
    """Rounds fp32 -> bf16 toward zero, as the Triton interpreter does."""

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
            y = (y.view(torch.int32) & ~0xFFFF).view(torch.float32)
        out.copy_(y)
        return out


def test_interpreter_bf16_allowance(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bf16 = [r for r in C.run(TruncatingBf16(), ops=["silu_and_mul"], quick=True).results if "bfloat16" in r.case]
    assert bf16 and all(r.status == "FAIL" and r.how == "accelerated" for r in bf16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    report = C.run(TruncatingBf16(), ops=["silu_and_mul"], quick=True)
    assert report.ok and all(r.how == "accelerated (interpreter)" for r in report.results)
