"""The HAL conformance suite: every backend x op against the float64 oracles in reference.py.

One table of cases (``cases()``) covers every op in ``interface.OPS``. Each case draws fresh
random inputs (never zeros), poisons its outputs with NaN, surrounds them with guard regions
that must survive untouched, runs the op on the backend and compares with the reference by
NMSE, Σ(a−b)²/Σb², against the per-op thresholds in ``NMSE_LIMITS`` (the one place they are
written down). NaN and inf never pass; exact ops (KV writes, block copies, greedy sampling)
must be bit-exact; random sampling must stay inside the allowed set and pass a chi-square
test against the target distribution.

    halserve conformance [--backend NAME] [--op NAME] [--quick] [--perf] [--json]
    halserve.hal.conformance.run(backend, ops=None, quick=False) -> Report
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from halserve.hal import reference as R
from halserve.hal.interface import OPS, AttentionMetadata, Backend, MoeSpec, PackedWeight, SamplingTensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---- thresholds: the one place ------------------------------------------------------------
# Max NMSE vs float64, by op class and input dtype. A kernel in the input dtype with fp32
# accumulation lands 10-100x under these; float32 means float32 (no TF32). bfloat16 cannot
# resolve relative errors below ~4e-3, so small systematic errors show in float32/float16.
NMSE_LIMITS: dict[str, dict[str, float]] = {
    "elementwise": {"float32": 1e-8, "bfloat16": 1e-5, "float16": 5e-7},  # rms_norm, rotary, silu_and_mul
    "matmul": {"float32": 5e-7, "bfloat16": 5e-5, "float16": 5e-6},  # linear, attention
    # moe rounds twice more (gate/up outputs and the activation) and sums experts that partly cancel
    "moe": {"float32": 5e-7, "bfloat16": 1.5e-4, "float16": 1e-5},
    "fp8": {"float32": 1e-4, "bfloat16": 1e-4, "float16": 1e-4},  # W8A8 fp8 vs the same quantization in f64
}
OP_CLASS = {"linear": "matmul", "attention": "matmul", "moe": "moe",
            "rms_norm": "elementwise", "rotary": "elementwise", "silu_and_mul": "elementwise"}
# How far pack_weight's quantized weight may be from the original (NMSE): catches bad scales.
PACK_LIMITS = {"int8": 1e-4, "fp8": 2e-3}
# The Triton interpreter (TRITON_INTERPRET=1) converts float32 -> bfloat16 by truncation,
# not round-to-nearest, which quadruples the mean-square rounding error of every bf16 store;
# bf16 NMSE limits are multiplied by this for backends running in it (never on hardware).
INTERPRETER_BF16_FACTOR = 4.0
SAMPLE_Z_LIMIT = 4.5  # chi-square goodness of fit as a z-score (one-sided p ~ 3e-6)
EXACT_OPS = ("write_kv", "swap_blocks", "copy_blocks")

GUARD = 256  # elements of guard before and after every output
INT_POISON = -0x5EED5EED


# ---- cases, results, reports --------------------------------------------------------------

@dataclass(slots=True)
class Case:
    op: str
    params: dict[str, Any]
    quick: bool = False

    @property
    def name(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass(slots=True)
class Outcome:
    """What an op runner found: the metric, its limit, and any hard failures."""

    metric: str  # nmse | exact | chi2_z
    value: float
    limit: float
    errors: list[str] = field(default_factory=list)
    timer: Callable[[], Any] | None = None  # re-runs the op on the same inputs (perf mode)
    flops: float = 0.0
    bytes: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and math.isfinite(self.value) and self.value <= self.limit


@dataclass(slots=True)
class Result:
    backend: str
    op: str
    case: str
    status: str  # PASS | FAIL | REFUSED
    how: str  # native | accelerated | native fallback | refused: reason
    metric: str = ""
    value: float | None = None
    limit: float | None = None
    detail: str = ""
    us: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct: float | None = None  # % of this device's ceiling for the bound that limits the op
    bound: str = ""  # memory | compute

    def line(self) -> str:
        if self.metric == "nmse":
            m = f"NMSE={self.value:.2e} (<= {self.limit:.1e})"
        elif self.metric == "exact":
            m = "exact" if self.value == 0 else f"{int(self.value)} mismatches"
        elif self.metric == "chi2_z":
            m = f"chi2 z={self.value:.2f} (<= {self.limit})"
        else:
            m = ""
        text = f"{self.backend:<10} {self.op:<12} {self.case:<58} {self.status:<7} {m:<28} {self.how}"
        if self.us is not None:
            rate = f"{self.tflops:.3f} TFLOP/s" if self.bound == "compute" else f"{self.gbps:.1f} GB/s"
            text += f" | {self.us:10.1f} us  {rate}  {self.pct:5.1f}% of {self.bound} ceiling"
        if self.detail:
            text += f"\n{'':<11}-> {self.detail}"
        return text


@dataclass(slots=True)
class Report:
    backend: str
    device: str
    how: str
    results: list[Result] = field(default_factory=list)
    ceilings: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> int:
        return sum(r.status == "PASS" for r in self.results)

    @property
    def failed(self) -> int:
        return sum(r.status == "FAIL" for r in self.results)

    @property
    def refused(self) -> int:
        return sum(r.status == "REFUSED" for r in self.results)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def summary(self) -> str:
        s = f"{self.backend}: {self.passed}/{self.passed + self.failed} passed"
        if self.refused:
            s += f", {self.refused} refused"
        return s

    def to_dict(self) -> dict:
        return {"backend": self.backend, "device": self.device, "how": self.how, "passed": self.passed,
                "failed": self.failed, "refused": self.refused, "ok": self.ok, "ceilings": self.ceilings,
                "results": [asdict(r) for r in self.results]}


def _c(op: str, quick: bool = False, **params) -> Case:
    return Case(op, params, quick)


def cases(quick: bool = False, ops: "list[str] | None" = None) -> list[Case]:
    """The case table (quick: the CI-sized subset)."""
    table: list[Case] = []
    # linear: every dtype, odd K and N, M from 1 to 257
    for dt in DTYPES:
        for m in (1, 7, 33, 257):
            table.append(_c("linear", m in (1, 33), dtype=dt, M=m, K=769, N=5125 if m != 257 else 1031,
                            bias=m == 7))
    table.append(_c("linear", True, dtype="float32", M=7, K=129, N=389, bias=True))
    for dt, m in (("bfloat16", 7), ("float32", 33)):
        table.append(_c("linear", dt == "bfloat16", dtype=dt, M=m, K=769, N=1031, scheme="int8"))
    for dt in ("bfloat16", "float32"):
        for scheme in ("fp8_per_tensor", "fp8"):
            table.append(_c("linear", dt == "bfloat16", dtype=dt, M=33, K=769, N=1031, scheme=scheme))
    # rms_norm with and without the fused residual
    for dt in DTYPES:
        for fused in (False, True):
            table.append(_c("rms_norm", True, dtype=dt, T=33, H=769 if not fused else 4096, fused=fused))
    table.append(_c("rms_norm", False, dtype="bfloat16", T=257, H=5120, fused=True))
    # rotary: neox and gpt-j, default and llama3 scaling, partial rotary
    for dt in DTYPES:
        for neox in (True, False):
            table.append(_c("rotary", dt != "float16", dtype=dt, T=33, Hq=8, Hk=2, D=128, rot=128,
                            neox=neox, scaling="llama3" if neox else "none"))
    table.append(_c("rotary", True, dtype="bfloat16", T=17, Hq=4, Hk=4, D=96, rot=48, neox=True, scaling="none"))
    table.append(_c("rotary", False, dtype="float32", T=33, Hq=4, Hk=1, D=64, rot=64, neox=False,
                    scaling="llama3"))
    # silu_and_mul
    for dt in DTYPES:
        table.append(_c("silu_and_mul", True, dtype=dt, T=33, I=1379))
    table.append(_c("silu_and_mul", False, dtype="bfloat16", T=257, I=5125))
    # write_kv, slots of -1 included
    for dt in DTYPES:
        for bs in (16, 32):
            table.append(_c("write_kv", bs == 16, dtype=dt, T=37, Hk=2, D=128 if bs == 16 else 96, bs=bs))
    # attention
    configs = [(hq, hk, d, bs) for hq, hk in ((8, 8), (8, 2), (16, 2)) for d in (64, 128, 96) for bs in (16, 32)]
    for scen in ("prefill_cached", "chunked", "decode", "mixed"):
        for hq, hk, d, bs in configs:
            table.append(_c("attention", False, dtype="bfloat16", scenario=scen, Hq=hq, Hk=hk, D=d, bs=bs))
        for dt in ("float32", "float16"):
            table.append(_c("attention", False, dtype=dt, scenario=scen, Hq=8, Hk=2, D=128, bs=16))
    quick_attn = [("float32", 8, 8, 64, 16), ("bfloat16", 8, 2, 128, 32), ("float16", 16, 2, 96, 16),
                  ("float32", 8, 1, 80, 32)]
    for dt, hq, hk, d, bs in quick_attn:
        table.append(_c("attention", True, dtype=dt, scenario="mixed", Hq=hq, Hk=hk, D=d, bs=bs))
    table.append(_c("attention", True, dtype="float32", scenario="prefill_cached", Hq=8, Hk=2, D=64, bs=16))
    table.append(_c("attention", True, dtype="bfloat16", scenario="long_decode", Hq=8, Hk=1, D=64, bs=16))
    table.append(_c("attention", False, dtype="float32", scenario="long_decode", Hq=32, Hk=8, D=128, bs=16))
    table.append(_c("attention", True, dtype="float32", scenario="sliding", Hq=8, Hk=2, D=64, bs=16, window=24))
    # moe
    for dt in DTYPES:
        for t in (1, 33):
            table.append(_c("moe", t == 33 or dt == "float32", dtype=dt, T=t, E=8, top_k=2, scoring="softmax",
                            groups=1, H=256, I=384))
    for dt in ("float32", "bfloat16"):
        table.append(_c("moe", True, dtype=dt, T=33, E=64, top_k=8, scoring="sigmoid", groups=8, H=128, I=96))
    table.append(_c("moe", False, dtype="bfloat16", T=33, E=8, top_k=2, scoring="softmax", groups=1, H=256,
                    I=384, scheme="int8"))
    # KV block transfers (bit-exact)
    for dt in ("bfloat16", "float32"):
        for direction in ("to_host", "to_device"):
            table.append(_c("swap_blocks", dt == "bfloat16", dtype=dt, direction=direction, n=5))
        table.append(_c("copy_blocks", dt == "bfloat16", dtype=dt, layers=3, n=6))
    # sampling
    table.append(_c("sample", True, kind="greedy", B=8, V=5003))
    table.append(_c("sample", True, kind="mixed", B=8, V=5003))
    for kind in ("top_k", "top_p", "min_p", "combined"):
        table.append(_c("sample", False, kind=kind, B=4096, V=160))
        # CI size: a quarter of the draws still gives the chi-square test its power on a
        # narrower vocabulary, and keeps interpreted kernels (one program per row) quick
        table.append(_c("sample", True, kind=kind, B=1024, V=48))
    if quick:
        table = [c for c in table if c.quick]
    if ops:
        bad = sorted(set(ops) - set(OPS))
        if bad:
            raise ValueError(f"unknown op(s) {', '.join(bad)}; ops are {', '.join(OPS)}")
        table = [c for c in table if c.op in ops]
    return table


# ---- helpers: inputs, guards, comparisons -------------------------------------------------

def _gen(case: Case, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case.op} {case.name}".encode()) ^ seed)


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(*shape, generator=g) * scale
    # never zeros: a zero input hides a missing write
    return torch.where(x == 0, torch.full_like(x, 1e-3), x)


def _guarded(shape: tuple[int, ...], dtype: torch.dtype, device, fill: torch.Tensor | None = None):
    """A contiguous tensor of ``shape`` inside a larger buffer poisoned with NaN (or a magic
    integer); returns (view, buffer)."""
    n = math.prod(shape)
    buf = torch.empty(n + 2 * GUARD, dtype=dtype, device=device)
    buf.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    view = buf[GUARD:GUARD + n].view(shape)
    if fill is not None:
        view.copy_(fill)
    return view, buf


def _guard_errors(buf: torch.Tensor, n: int, what: str = "out") -> list[str]:
    head, tail = buf[:GUARD], buf[GUARD + n:]
    if buf.dtype.is_floating_point:
        ok_h, ok_t = bool(torch.isnan(head).all()), bool(torch.isnan(tail).all())
    else:
        ok_h, ok_t = bool((head == INT_POISON).all()), bool((tail == INT_POISON).all())
    errs = []
    if not ok_h:
        errs.append(f"wrote before the start of {what} (guard region changed)")
    if not ok_t:
        errs.append(f"wrote past the end of {what} (guard region changed)")
    return errs


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A NaN-safe view for bitwise comparison."""
    t = t.detach().cpu().contiguous()
    size = t.element_size()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])


def _mismatches(actual: torch.Tensor, expected: torch.Tensor) -> int:
    if actual.shape != expected.shape:
        return max(actual.numel(), expected.numel(), 1)
    return int((_bits(actual) != _bits(expected.to(actual.dtype))).sum())


def _unchanged(t: torch.Tensor, before: torch.Tensor, what: str) -> list[str]:
    n = _mismatches(t, before)
    return [f"modified its input {what} ({n} elements changed)"] if n else []


def _limit(op: str, dtype: str, scheme: str = "none") -> float:
    cls = "fp8" if scheme.startswith("fp8") else OP_CLASS[op]
    return NMSE_LIMITS[cls][dtype]


def _returned(ret, out: torch.Tensor) -> list[str]:
    if isinstance(ret, torch.Tensor) and ret.data_ptr() != out.data_ptr():
        return ["returned a tensor other than the out= it was given"]
    return []


def _kv_shape(b: Backend, nblocks: int, bs: int, hk: int, d: int) -> tuple[int, ...]:
    shape = tuple(b.kv_cache_shape(nblocks, bs, hk, d))
    if shape != (2, nblocks, bs, hk, d):
        raise ValueError(f"kv_cache_shape gave {shape}; the suite's references read the default layout "
                         f"[2, blocks, block_size, kv_heads, head_dim] = {(2, nblocks, bs, hk, d)}")
    return shape


def _esize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


# ---- op runners ---------------------------------------------------------------------------
# Each takes (backend, params, generator, device) and returns an Outcome. Inputs are drawn
# on the CPU (same values on every device) and moved to the backend's device.

def _run_linear(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    m, k, n = p["M"], p["K"], p["N"]
    scheme = p.get("scheme", "none")
    x = _randn(g, m, k).to(dt)
    w = _randn(g, n, k, scale=k ** -0.5).to(dt)
    bias = _randn(g, n).to(dt) if p.get("bias") else None
    errors: list[str] = []
    pw = b.pack_weight(w.to(dev), scheme)
    pw_cpu = PackedWeight(pw.weight.cpu(), pw.scheme, None if pw.scale is None else pw.scale.cpu(),
                          pw.act_scheme, pw.out_features, pw.in_features)
    if scheme != "none":
        if tuple(pw.weight.shape) != (n, k):
            errors.append(f"pack_weight gave weight shape {tuple(pw.weight.shape)}, expected {(n, k)}")
        else:
            limit = PACK_LIMITS[pw.scheme]
            q_err = R.nmse(R.dequantize(pw_cpu), w)
            if not q_err <= limit:
                errors.append(f"pack_weight({scheme}) dequantizes to NMSE {q_err:.2e} vs the weight (> {limit})")
    xd, bd = x.to(dev), None if bias is None else bias.to(dev)
    out, buf = _guarded((m, n), dt, dev)
    ret = b.linear(xd, pw, bd, out=out)
    b.synchronize()
    errors += _guard_errors(buf, out.numel()) + _returned(ret, out) + _unchanged(xd, x, "x")
    value = R.nmse(out, R.linear(x, pw_cpu, bias))
    wbytes = n * k * (1 if scheme != "none" else _esize(p["dtype"]))
    return Outcome("nmse", value, _limit("linear", p["dtype"], scheme), errors,
                   timer=lambda: b.linear(xd, pw, bd, out=out), flops=2.0 * m * n * k,
                   bytes=wbytes + (m * k + m * n) * _esize(p["dtype"]))


def _run_rms_norm(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    t, h = p["T"], p["H"]
    x = _randn(g, t, h).to(dt)
    w = (1 + 0.1 * _randn(g, h)).to(dt)
    res = _randn(g, t, h).to(dt) if p["fused"] else None
    xd, wd = x.to(dev), w.to(dev)
    rd = None if res is None else res.to(dev)
    out, buf = _guarded((t, h), dt, dev)
    ret = b.rms_norm(xd, wd, 1e-6, residual=rd, out=out)
    b.synchronize()
    errors = _guard_errors(buf, out.numel()) + _unchanged(xd, x, "x")
    if res is None:
        errors += _returned(ret, out)
        value = R.nmse(out, R.rms_norm(x, w, 1e-6))
    else:
        ry, rh = R.rms_norm(x, w, 1e-6, residual=res)
        if not (isinstance(ret, tuple) and len(ret) == 2):
            return Outcome("nmse", math.inf, 1, errors + ["with residual it must return (out, x + residual)"])
        errors += _returned(ret[0], out)
        if _mismatches(rd, res) and _mismatches(rd, ret[1]):
            errors.append("modified residual to something other than x + residual")
        value = max(R.nmse(out, ry), R.nmse(ret[1], rh))
    nbytes = t * h * _esize(p["dtype"]) * (4 if res is not None else 2)
    return Outcome("nmse", value, _limit("rms_norm", p["dtype"]), errors,
                   timer=lambda: b.rms_norm(xd, wd, 1e-6, residual=rd, out=out), flops=4.0 * t * h, bytes=nbytes)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def _run_rotary(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    from halserve.hal.native import build_rope_cache

    dt = DTYPES[p["dtype"]]
    t, hq, hk, d, rot = p["T"], p["Hq"], p["Hk"], p["D"], p["rot"]
    max_pos = 32768
    cache = build_rope_cache(d, rot, max_pos, 500000.0, LLAMA3_SCALING if p["scaling"] == "llama3" else None)
    pos = torch.randint(0, max_pos, (t,), generator=g)
    width = (hq + 2 * hk) * d
    qkv0 = _randn(g, t, width).to(dt)
    # q and k are strided views of one fused qkv buffer, as a model produces them
    qkv, buf = _guarded((t, width), dt, dev, fill=qkv0.to(dev))
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    pd, cd = pos.to(dev), cache.to(dev)
    b.rotary(pd, q, k, cd, p["neox"])
    b.synchronize()
    rq, rk = R.rotary(pos, qkv0[:, :hq * d].view(t, hq, d), qkv0[:, hq * d:(hq + hk) * d].view(t, hk, d),
                      cache, p["neox"])
    errors = _guard_errors(buf, qkv.numel(), "qkv")
    errors += _unchanged(qkv[:, (hq + hk) * d:], qkv0[:, (hq + hk) * d:], "v (next to k in qkv)")
    if rot < d:
        errors += _unchanged(q[..., rot:], qkv0[:, :hq * d].view(t, hq, d)[..., rot:], "q past rot_dim")
    value = max(R.nmse(q, rq), R.nmse(k, rk))
    nbytes = 2 * t * (hq + hk) * rot * _esize(p["dtype"]) + t * rot * 4
    return Outcome("nmse", value, _limit("rotary", p["dtype"]), errors,
                   timer=lambda: b.rotary(pd, q, k, cd, p["neox"]), flops=3.0 * t * (hq + hk) * rot,
                   bytes=nbytes)


def _run_silu_and_mul(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    t, i = p["T"], p["I"]
    x = _randn(g, t, 2 * i).to(dt)
    xd = x.to(dev)
    out, buf = _guarded((t, i), dt, dev)
    ret = b.silu_and_mul(xd, out=out)
    b.synchronize()
    errors = _guard_errors(buf, out.numel()) + _returned(ret, out) + _unchanged(xd, x, "x")
    return Outcome("nmse", R.nmse(out, R.silu_and_mul(x)), _limit("silu_and_mul", p["dtype"]), errors,
                   timer=lambda: b.silu_and_mul(xd, out=out), flops=5.0 * t * i,
                   bytes=3 * t * i * _esize(p["dtype"]))


def _run_write_kv(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    t, hk, d, bs = p["T"], p["Hk"], p["D"], p["bs"]
    nblocks = 9
    shape = _kv_shape(b, nblocks, bs, hk, d)
    cache0 = _randn(g, *shape).to(dt)
    key, val = _randn(g, t, hk, d).to(dt), _randn(g, t, hk, d).to(dt)
    slots = torch.randperm(nblocks * bs, generator=g)[:t]
    pad = torch.rand(t, generator=g) < 0.25
    pad[0] = pad[-1] = True
    slots = torch.where(pad, torch.full_like(slots, -1), slots)
    cache, buf = _guarded(shape, dt, dev, fill=cache0.to(dev))
    kd, vd, sd = key.to(dev), val.to(dev), slots.to(dev)
    b.write_kv(kd, vd, cache, sd)
    b.synchronize()
    errors = _guard_errors(buf, cache.numel(), "kv_cache") + _unchanged(kd, key, "key")
    n = _mismatches(cache, R.write_kv(key, val, cache0, slots))
    return Outcome("exact", n, 0, errors, timer=lambda: b.write_kv(kd, vd, cache, sd),
                   bytes=4.0 * t * hk * d * _esize(p["dtype"]))


# (seq_lens, query_lens): the query tokens are the last query_len positions of each sequence
SCENARIOS: dict[str, tuple[list[int], list[int]]] = {
    "prefill_cached": ([61, 40, 19], [24, 40, 19]),  # 37 cached tokens cross two block edges
    "chunked": ([100, 48], [37, 48]),  # a middle chunk of a long prompt, and a first chunk
    "decode": ([1, 17, 64, 100, 33], [1, 1, 1, 1, 1]),
    "mixed": ([45, 1, 130, 70, 19], [1, 1, 1, 23, 19]),  # decodes first, then prefill chunks
    "long_decode": ([4133, 4500], [1, 1]),
    "sliding": ([45, 1, 130, 70, 19], [1, 1, 1, 23, 19]),
}


def attention_inputs(p: dict, g: torch.Generator, kv_shape: Callable[..., tuple[int, ...]]):
    """(q, kv_cache, meta) on the CPU for an attention case of the table."""
    seq_lens, query_lens = SCENARIOS[p["scenario"]]
    return paged_attention_case(seq_lens, query_lens, p["bs"], p["Hq"], p["Hk"], p["D"], DTYPES[p["dtype"]], g,
                                kv_shape, p.get("window"))


def paged_attention_case(seq_lens: list[int], query_lens: list[int], bs: int, hq: int, hk: int, d: int,
                         dt: torch.dtype, g: torch.Generator,
                         kv_shape: Callable[..., tuple[int, ...]] = lambda n, bs, hk, d: (2, n, bs, hk, d),
                         window: int | None = None):
    """(q, kv_cache, meta) on the CPU: random cache, shuffled block tables, block 0 never used
    by a sequence (padding entries point at it), one spare padding column; the query tokens
    are the last query_len positions of each sequence."""
    nblk = [(s + bs - 1) // bs for s in seq_lens]
    total = sum(nblk) + 2
    kv = _randn(g, *kv_shape(total, bs, hk, d)).to(dt)
    perm = torch.randperm(total - 1, generator=g) + 1
    tables = torch.zeros(len(seq_lens), max(nblk) + 1, dtype=torch.int32)
    at = 0
    for i, nb in enumerate(nblk):
        tables[i, :nb] = perm[at:at + nb]
        at += nb
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    ndec = 0
    while ndec < len(query_lens) and query_lens[ndec] == 1:
        ndec += 1
    meta = AttentionMetadata(
        cu_seqlens_q=cu, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        slot_mapping=torch.full((sum(query_lens),), -1, dtype=torch.int64), max_seqlen_q=max(query_lens),
        max_seqlen_k=max(seq_lens), query_lens_host=list(query_lens), seq_lens_host=list(seq_lens),
        block_size=bs, num_decode_seqs=ndec, sliding_window=window)
    q = _randn(g, sum(query_lens), hq, d).to(dt)
    return q, kv, meta


def _meta_to(meta: AttentionMetadata, dev) -> AttentionMetadata:
    return AttentionMetadata(
        meta.cu_seqlens_q.to(dev), meta.seq_lens.to(dev), meta.block_tables.to(dev), meta.slot_mapping.to(dev),
        meta.max_seqlen_q, meta.max_seqlen_k, list(meta.query_lens_host), list(meta.seq_lens_host),
        meta.block_size, meta.num_decode_seqs, meta.sliding_window)


def _run_attention(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    q, kv, meta = attention_inputs(p, g, lambda *a: _kv_shape(b, *a))
    qd, kvd, md = q.to(dev), kv.to(dev), _meta_to(meta, dev)
    scale = p["D"] ** -0.5
    out, buf = _guarded(tuple(q.shape), dt, dev)
    ret = b.attention(qd, kvd, md, scale, out=out)
    b.synchronize()
    errors = (_guard_errors(buf, out.numel()) + _returned(ret, out) + _unchanged(qd, q, "q")
              + _unchanged(kvd, kv, "kv_cache"))
    value = R.nmse(out, R.attention(q, kv, meta, scale))
    win = p.get("window") or 1 << 30
    ctx = sum(min(s - ql + j + 1, win) for s, ql in zip(meta.seq_lens_host, meta.query_lens_host)
              for j in range(ql))
    kv_read = sum(meta.seq_lens_host) * p["Hk"] * p["D"] * 2
    return Outcome("nmse", value, _limit("attention", p["dtype"]), errors,
                   timer=lambda: b.attention(qd, kvd, md, scale, out=out), flops=4.0 * ctx * p["Hq"] * p["D"],
                   bytes=(kv_read + 2 * q.numel()) * _esize(p["dtype"]))


def _run_moe(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    t, e, h, inter = p["T"], p["E"], p["H"], p["I"]
    x = _randn(g, t, h).to(dt)
    logits = _randn(g, t, e)
    w13 = _randn(g, e, 2 * inter, h, scale=h ** -0.5).to(dt)
    w2 = _randn(g, e, h, inter, scale=inter ** -0.5).to(dt)
    grouped = p["groups"] > 1
    spec = MoeSpec(top_k=p["top_k"], scoring=p["scoring"], renormalize=True, num_expert_group=p["groups"],
                   topk_group=p["groups"] // 2 if grouped else 1,
                   correction_bias=_randn(g, e, scale=0.1) if grouped else None,
                   routed_scaling_factor=2.5 if grouped else 1.0)
    spec_d = MoeSpec(spec.top_k, spec.scoring, spec.renormalize, spec.num_expert_group, spec.topk_group,
                     None if spec.correction_bias is None else spec.correction_bias.to(dev),
                     spec.routed_scaling_factor)
    scheme = p.get("scheme", "none")
    p13, p2 = b.pack_weight(w13.to(dev), scheme), b.pack_weight(w2.to(dev), scheme)
    cpu = [PackedWeight(pw.weight.cpu(), pw.scheme, None if pw.scale is None else pw.scale.cpu(),
                        pw.act_scheme, pw.out_features, pw.in_features) for pw in (p13, p2)]
    xd, ld = x.to(dev), logits.to(dev)
    out, buf = _guarded((t, h), dt, dev)
    ret = b.moe(xd, ld, p13, p2, spec_d, out=out)
    b.synchronize()
    errors = _guard_errors(buf, out.numel()) + _returned(ret, out) + _unchanged(xd, x, "x")
    value = R.nmse(out, R.moe(x, logits, cpu[0], cpu[1], spec))
    used = min(e, t * p["top_k"])
    wbytes = used * 3 * h * inter * (1 if scheme != "none" else _esize(p["dtype"]))
    return Outcome("nmse", value, _limit("moe", p["dtype"], scheme), errors,
                   timer=lambda: b.moe(xd, ld, p13, p2, spec_d, out=out),
                   flops=2.0 * t * p["top_k"] * 3 * h * inter, bytes=wbytes)


def _block_caches(b: Backend, p: dict, g: torch.Generator, nblocks: int):
    dt = DTYPES[p["dtype"]]
    return _randn(g, *_kv_shape(b, nblocks, 16, 2, 64)).to(dt)


def _run_swap_blocks(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    src0, dst0 = _block_caches(b, p, g, 12), _block_caches(b, p, g, 9)
    n = p["n"]
    mapping = torch.stack([torch.randperm(12, generator=g)[:n], torch.randperm(9, generator=g)[:n]], dim=1)
    src_dev, dst_dev = (dev, "cpu") if p["direction"] == "to_host" else ("cpu", dev)
    src = src0.to(src_dev)
    dst, buf = _guarded(tuple(dst0.shape), dst0.dtype, dst_dev, fill=dst0.to(dst_dev))
    b.swap_blocks(src, dst, mapping)
    b.synchronize()
    errors = _guard_errors(buf, dst.numel(), "dst") + _unchanged(src, src0, "src")
    n_bad = _mismatches(dst, R.swap_blocks(src0, dst0, mapping))
    block_bytes = src0[:, 0].numel() * src0.element_size()
    return Outcome("exact", n_bad, 0, errors, timer=lambda: b.swap_blocks(src, dst, mapping),
                   bytes=2.0 * n * block_bytes)


def _run_copy_blocks(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    caches0 = [_block_caches(b, p, g, 12) for _ in range(p["layers"])]
    # sources and destinations are disjoint: chained copies are not part of the contract
    perm = torch.randperm(12, generator=g)
    n = p["n"]
    mapping = torch.stack([perm[:n], perm[n:2 * n]], dim=1)
    pairs = [_guarded(tuple(c.shape), c.dtype, dev, fill=c.to(dev)) for c in caches0]
    caches = [c for c, _ in pairs]
    b.copy_blocks(caches, mapping)
    b.synchronize()
    errors = []
    for i, (c, buf) in enumerate(pairs):
        errors += _guard_errors(buf, c.numel(), f"kv_caches[{i}]")
    expected = R.copy_blocks(caches0, mapping)
    n_bad = sum(_mismatches(c, e) for c, e in zip(caches, expected))
    block_bytes = caches0[0][:, 0].numel() * caches0[0].element_size()
    return Outcome("exact", n_bad, 0, errors, timer=lambda: b.copy_blocks(caches, mapping),
                   bytes=2.0 * n * block_bytes * len(caches))


SAMPLE_KINDS = {
    "top_k": dict(temperature=1.0, top_k=9),
    "top_p": dict(temperature=0.8, top_p=0.7),
    "min_p": dict(temperature=1.2, min_p=0.08),
    "combined": dict(temperature=0.7, top_k=25, top_p=0.9, min_p=0.02),
}


def sampling_tensors(b: int, temperature, top_k=0, top_p=1.0, min_p=0.0, seeds=None, steps=None,
                     device="cpu") -> SamplingTensors:
    """SamplingTensors with host hints consistent with the values (scalars broadcast)."""
    def full(v, dt):
        return (v.to(dt) if isinstance(v, torch.Tensor) else torch.full((b,), v, dtype=dt))

    temp, tk = full(temperature, torch.float32), full(top_k, torch.int32)
    tp, mp = full(top_p, torch.float32), full(min_p, torch.float32)
    sd = full(seeds if seeds is not None else 0, torch.int64)
    st = full(steps if steps is not None else 0, torch.int64)
    return SamplingTensors(
        temp.to(device), tk.to(device), tp.to(device), mp.to(device), sd.to(device), st.to(device),
        all_greedy=bool((temp == 0).all()), all_random=bool((temp > 0).all()),
        no_top_k=bool((tk <= 0).all()), no_top_p=bool((tp >= 1).all()), no_min_p=bool((mp <= 0).all()))


def chi2_z(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square of counts vs probs as a z-score (Wilson-Hilferty); bins with
    expected count < 5 are pooled."""
    n = float(counts.sum())
    exp = probs.double() * n
    obs = counts.double()
    big = exp >= 5
    e_bins = torch.cat([exp[big], exp[~big].sum().reshape(1)])
    o_bins = torch.cat([obs[big], obs[~big].sum().reshape(1)])
    if float(e_bins[-1]) < 5:  # fold a small pool into the last regular bin
        if e_bins.numel() > 1:
            e_bins = torch.cat([e_bins[:-2], (e_bins[-2] + e_bins[-1]).reshape(1)])
            o_bins = torch.cat([o_bins[:-2], (o_bins[-2] + o_bins[-1]).reshape(1)])
    dof = e_bins.numel() - 1
    if dof < 1:
        return 0.0
    chi2 = float(((o_bins - e_bins) ** 2 / e_bins).sum())
    k = float(dof)
    return ((chi2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))


def _run_sample(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    bsz, v, kind = p["B"], p["V"], p["kind"]
    errors: list[str] = []
    if kind in ("greedy", "mixed"):
        logits = _randn(g, bsz, v, scale=3.0)
        temp = torch.zeros(bsz) if kind == "greedy" else torch.tensor([0.0, 0.9, 0.0, 1.3] * (bsz // 4))
        params = sampling_tensors(bsz, temp, top_k=torch.tensor([0, 5] * (bsz // 2)) if kind == "mixed" else 0,
                                  seeds=torch.arange(bsz) + 11, steps=torch.arange(bsz), device=dev)
    else:
        row = _randn(g, 1, v, scale=2.0)
        logits = row.expand(bsz, v).contiguous()
        params = sampling_tensors(bsz, **SAMPLE_KINDS[kind], seeds=torch.full((bsz,), 1234) + torch.arange(bsz) % 3,
                                  steps=torch.arange(bsz) // 3, device=dev)
    ld = logits.to(dev)
    out, buf = _guarded((bsz,), torch.int64, dev)
    ret = b.sample(ld, params, out=out)
    b.synchronize()
    errors += _guard_errors(buf, bsz) + _returned(ret, out) + _unchanged(ld, logits, "logits")
    tokens = out.cpu()
    target = R.sampling_probs(logits[:1] if kind not in ("greedy", "mixed") else logits,
                              sampling_tensors(1 if kind not in ("greedy", "mixed") else bsz,
                                               **({"temperature": params.temperature.cpu(),
                                                   "top_k": params.top_k.cpu()} if kind in ("greedy", "mixed")
                                                  else SAMPLE_KINDS[kind])))
    timer = lambda: b.sample(ld, params, out=out)  # noqa: E731
    nbytes = 4.0 * bsz * v
    if (tokens < 0).any() or (tokens >= v).any():
        return Outcome("exact", bsz, 0, errors + ["token ids outside [0, vocab)"])
    if kind in ("greedy", "mixed"):
        greedy = params.temperature.cpu() == 0
        want = target.argmax(dim=-1)
        bad = int((tokens[greedy] != want[greedy]).sum())
        outside = int((target[~greedy].gather(1, tokens[~greedy, None]) == 0).sum())
        if outside:
            errors.append(f"{outside} random rows sampled outside their top-k set")
        return Outcome("exact", bad, 0, errors, timer=timer, bytes=nbytes)
    probs = target[0]
    outside = int((probs[tokens] == 0).sum())
    if outside:
        errors.append(f"{outside}/{bsz} draws outside the allowed set")
    again = torch.empty_like(out)
    b.sample(ld, params, out=again)
    if not torch.equal(again.cpu(), tokens):
        errors.append("not reproducible: the same seeds and steps gave different tokens")
    for r in (0, 1, bsz - 1):
        one = sampling_tensors(1, **SAMPLE_KINDS[kind], seeds=params.seeds[r:r + 1].cpu(),
                               steps=params.steps[r:r + 1].cpu(), device=dev)
        alone = b.sample(ld[r:r + 1], one)
        if int(alone.reshape(-1)[0]) != int(tokens[r]):
            errors.append(f"row {r} drew a different token alone than in the batch")
            break
    z = chi2_z(torch.bincount(tokens, minlength=v), probs)
    return Outcome("chi2_z", z, SAMPLE_Z_LIMIT, errors, timer=timer, bytes=nbytes)


RUNNERS: dict[str, Callable[[Backend, dict, torch.Generator, Any], Outcome]] = {
    "linear": _run_linear, "rms_norm": _run_rms_norm, "rotary": _run_rotary, "silu_and_mul": _run_silu_and_mul,
    "write_kv": _run_write_kv, "attention": _run_attention, "moe": _run_moe, "swap_blocks": _run_swap_blocks,
    "copy_blocks": _run_copy_blocks, "sample": _run_sample,
}
assert set(RUNNERS) == set(OPS), "every HAL op needs a conformance runner"

# case params -> the spec keys passed to backend.supports(op, **spec)
SPEC_KEYS = {
    "linear": {"dtype": "dtype", "scheme": "scheme", "M": "m", "K": "k", "N": "n"},
    "rms_norm": {"dtype": "dtype", "H": "hidden_size", "fused": "residual"},
    "rotary": {"dtype": "dtype", "D": "head_dim", "rot": "rot_dim", "neox": "is_neox"},
    "silu_and_mul": {"dtype": "dtype"},
    "write_kv": {"dtype": "dtype", "D": "head_dim", "bs": "block_size"},
    "attention": {"dtype": "dtype", "Hq": "num_heads", "Hk": "num_kv_heads", "D": "head_dim", "bs": "block_size",
                  "window": "sliding_window"},
    "moe": {"dtype": "dtype", "E": "num_experts", "top_k": "top_k", "scoring": "scoring", "scheme": "scheme"},
    "swap_blocks": {"dtype": "dtype"},
    "copy_blocks": {"dtype": "dtype"},
    "sample": {},
}


def supports_spec(case: Case) -> dict[str, Any]:
    """The keyword arguments ``supports(op, **spec)`` gets for a case."""
    keys = SPEC_KEYS[case.op]
    spec = {keys[k]: v for k, v in case.params.items() if k in keys}
    if case.op == "moe" and case.params.get("groups", 1) > 1:
        spec["num_expert_group"] = case.params["groups"]
    return spec


def interpreted(backend: Backend) -> bool:
    """True when ``backend`` runs its kernels in the Triton interpreter on the CPU."""
    import os

    from halserve import hal

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    return torch.device(backend.device).type == "cpu" and hal.interpreter_ok(type(backend))


def _how(backend: Backend, case: Case) -> str:
    from halserve.hal.native import NativeBackend

    try:
        s = backend.supports(case.op, **supports_spec(case))
    except Exception as e:
        return f"refused: supports() raised {type(e).__name__}: {e}"
    if s is True:
        if type(backend) is NativeBackend:
            return "native"
        return "accelerated (interpreter)" if interpreted(backend) else "accelerated"
    s = str(s)
    if s.startswith("native fallback"):
        return "native fallback"
    return s if s.startswith("refused") else f"refused: {s}"


# ---- perf ---------------------------------------------------------------------------------

def measure_ceilings(device, dtypes=("float32", "bfloat16", "float16")) -> dict[str, Any]:
    """This device's copy bandwidth (GB/s, read + write) and GEMM peak per dtype (TFLOP/s),
    measured once with torch."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    nbytes = (1 << 30) if dev.type == "cuda" else (64 << 20)
    src = torch.ones(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    result: dict[str, Any] = {"device": str(dev), "copy_GBps": 2 * nbytes / best / 1e9, "gemm_TFLOPs": {}}
    for name in dtypes:
        n = 8192 if dev.type == "cuda" else (1024 if name == "float32" else 512)
        a = torch.randn(n, n, device=dev).to(DTYPES[name])
        bm = torch.randn(n, n, device=dev).to(DTYPES[name])
        a @ bm
        best = math.inf
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            a @ bm
            sync()
            best = min(best, time.perf_counter() - t0)
        result["gemm_TFLOPs"][name] = 2 * n ** 3 / best / 1e12
    return result


def _time(fn: Callable[[], Any], sync: Callable[[], None], budget_s: float = 0.2) -> float:
    """Seconds per call: one warm-up, then repeat until the budget is spent (at most 100)."""
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 100:
        fn()
        n += 1
        if n >= 3 and time.perf_counter() - t0 > budget_s:
            break
    sync()
    return (time.perf_counter() - t0) / n


def _perf(res: Result, outcome: Outcome, backend: Backend, case: Case, ceilings: dict) -> None:
    if outcome.timer is None:
        return
    sec = _time(outcome.timer, backend.synchronize)
    res.us = sec * 1e6
    res.gbps = outcome.bytes / sec / 1e9
    res.tflops = outcome.flops / sec / 1e12
    peak = ceilings["gemm_TFLOPs"].get(case.params.get("dtype", "float32"), max(ceilings["gemm_TFLOPs"].values()))
    pct_mem = 100 * res.gbps / ceilings["copy_GBps"]
    pct_flops = 100 * res.tflops / peak if peak else 0.0
    res.bound, res.pct = ("compute", pct_flops) if pct_flops > pct_mem else ("memory", pct_mem)


# ---- driver -------------------------------------------------------------------------------

def run_case(backend: Backend, case: Case, seed: int = 0, perf: bool = False,
             ceilings: dict | None = None) -> Result:
    """Run one case on one backend; never raises (an exception is a FAIL)."""
    how = _how(backend, case)
    res = Result(backend.name, case.op, case.name, "REFUSED", how)
    if how.startswith("refused"):
        return res
    try:
        outcome = RUNNERS[case.op](backend, case.params, _gen(case, seed), backend.device)
    except Exception as e:
        res.status, res.detail = "FAIL", f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return res
    if outcome.metric == "nmse" and case.params.get("dtype") == "bfloat16" and interpreted(backend):
        outcome.limit *= INTERPRETER_BF16_FACTOR
    res.metric, res.value, res.limit = outcome.metric, float(outcome.value), float(outcome.limit)
    res.status = "PASS" if outcome.ok else "FAIL"
    problems = list(outcome.errors)
    if not math.isfinite(outcome.value):
        problems.append("NaN/inf in the output (or output never written)")
    res.detail = "; ".join(problems)
    if perf and ceilings is not None:
        try:
            _perf(res, outcome, backend, case, ceilings)
        except Exception as e:
            res.detail = (res.detail + "; " if res.detail else "") + f"perf run raised {type(e).__name__}: {e}"
    return res


def runnable_backends() -> list[tuple[str, str]]:
    """(name, how it runs) for every backend that can execute on this machine: probe score
    > 0, or a class that says ``interpreter_ok()`` (forced, on the CPU)."""
    from halserve import hal

    found = []
    for name, cls, probe in hal.available():
        if cls is None:
            continue
        if probe.score > 0:
            found.append((name, f"probe {probe.score}: {probe.reason}"))
        elif hal.interpreter_ok(cls):
            found.append((name, f"forced in interpreter mode (probe: {probe.reason})"))
    return found


def run(backend: "str | Backend", ops: "list[str] | None" = None, quick: bool = False, perf: bool = False,
        seed: int = 0, on_result: Callable[[Result], None] | None = None,
        ceilings: dict | None = None) -> Report:
    """Run the conformance cases (``quick``: the CI subset; ``ops``: only these) on a backend
    given by name (forced, see ``hal.create``) or as an instance. ``perf`` also times each
    case against the device's ceilings (measured here unless given)."""
    from halserve import hal

    if isinstance(backend, str):
        how = dict(runnable_backends()).get(backend.partition(":")[0], "forced")
        backend = hal.create(backend)
    else:
        how = "instance"
    report = Report(backend.name, str(backend.device), how)
    if perf:
        report.ceilings = ceilings or measure_ceilings(backend.device)
    for case in cases(quick=quick, ops=ops):
        res = run_case(backend, case, seed=seed, perf=perf, ceilings=report.ceilings)
        report.results.append(res)
        if on_result is not None:
            on_result(res)
    return report


# ---- CLI ----------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="run only this backend (repeatable; forced: runs even when not auto-selected)")
    p.add_argument("--op", action="append", metavar="NAME", help=f"run only this op (repeatable): {', '.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="CI-sized subset of the cases")
    p.add_argument("--perf", action="store_true", help="also time each case: us/run, GB/s or TFLOP/s, %% of ceiling")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    p.add_argument("--seed", type=int, default=0, help="mixed into every case's input seed (default 0)")


def main(args: argparse.Namespace) -> int:
    from halserve import hal

    ops = [o for spec in (args.op or []) for o in spec.split(",") if o]
    cases(ops=ops)  # validates op names early (ValueError -> one-line error)
    if args.backend:
        targets = [(name, "forced") for name in args.backend]
    else:
        targets = runnable_backends()
        if not args.json:
            runnable = {n for n, _ in targets}
            for name, _, probe in hal.available():
                if name not in runnable:
                    print(f"{name:<10} not run: {probe.reason}")
    out = sys.stdout
    reports = []
    for name, how in targets:
        backend = hal.create(name)
        if not args.json:
            print(f"== {name} on {backend.device} ({how}) ==", file=out, flush=True)
        stream = None if args.json else (lambda r: print(r.line(), file=out, flush=True))
        ceilings = None
        if args.perf:
            ceilings = measure_ceilings(backend.device)
            if not args.json:
                peaks = ", ".join(f"{k} {v:.3f}" for k, v in ceilings["gemm_TFLOPs"].items())
                print(f"ceilings on {ceilings['device']}: copy {ceilings['copy_GBps']:.1f} GB/s; "
                      f"GEMM TFLOP/s {peaks}", flush=True)
        report = run(backend, ops=ops or None, quick=args.quick, perf=args.perf, seed=args.seed,
                     on_result=stream, ceilings=ceilings)
        report.how = how
        if not args.json:
            print(report.summary(), flush=True)
        reports.append(report)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    elif len(reports) > 1:
        print("; ".join(r.summary() for r in reports))
    return 0 if all(r.ok for r in reports) else 1
