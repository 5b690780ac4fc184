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
import contextlib
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from halserve.hal import reference as R
from halserve.hal.interface import OPS, AttentionMetadata, Backend, MoeSpec, PackedWeight, SamplingTensors
from halserve.hal.kv_fp8 import quantize_kv
from halserve.hal.quant import FP8_DTYPE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---- thresholds: the one place ------------------------------------------------------------
# Max NMSE vs float64, by op class and input dtype (docs/conformance.md has the derivation).
# The unit is u, the NMSE of ONE round-to-nearest store of a random value in the dtype:
# mean (ulp/x)^2 / 12 over a log-uniform mantissa = 2^(-2(p-1)) * 0.541 / 12, p the
# significand bits: bf16 (p=8) u = 2.75e-6, fp16 (p=11) 4.3e-8, fp32 (p=24) 6.4e-16 — the
# native backend measures 2.77e-6 and 4.3e-8 for one store (silu_and_mul), as predicted.
# A kernel in the input dtype with fp32 accumulation rounds 1-3 times on the way (fused
# rms_norm rounds h, then y: native 2.4u; GEMM 2u; moe rounds gate/up, the activation and
# sums partly cancelling experts: native 8.5u). Limits are >= 10x the worst native case
# over the full table in every dtype: elementwise and matmul 36u in bf16/fp16 (fp16 matmul
# keeps the 5e-6 = 116u the cuda kernels were first proven at), moe ~110u (bf16) / 230u
# (fp16). float32 means float32: 1e-9 sits >10^4 above native and ~100x below TF32 (p=11,
# two rounded inputs: 8.6e-8), so a TF32 dot or a half-precision intermediate fails.
NMSE_LIMITS: dict[str, dict[str, float]] = {
    "elementwise": {"float32": 1e-9, "bfloat16": 1e-4, "float16": 1.5e-6},  # rms_norm, rotary, silu_and_mul
    "matmul": {"float32": 1e-9, "bfloat16": 1e-4, "float16": 5e-6},  # linear, attention
    "moe": {"float32": 1e-9, "bfloat16": 3e-4, "float16": 1e-5},
    "fp8": {"float32": 1e-4, "bfloat16": 1e-4, "float16": 1e-4},  # W8A8 fp8 vs the same quantization in f64
}
OP_CLASS = {"linear": "matmul", "attention": "matmul", "moe": "moe",
            "rms_norm": "elementwise", "rotary": "elementwise", "silu_and_mul": "elementwise",
            "rotary_write_kv": "elementwise"}
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
    """The case table (quick: the CI-sized subset). Every argument of every op is varied by
    some quick case whose result depends on it; ``COVERAGE`` says which case parameter varies
    which op argument, and tests/conformance/test_meta.py holds the table to it."""
    table: list[Case] = []
    # linear: every dtype, odd K and N, M from 1 to 257, bias on and off, every scheme
    for dt in DTYPES:
        for m in (1, 7, 33, 257):
            table.append(_c("linear", False, dtype=dt, M=m, K=769, N=5125 if m != 257 else 1031,
                            bias=m == 7, scheme="none"))
        for m in (1, 33):  # CI size: N=1031 keeps the odd tail at a fifth of the work in an interpreter
            table.append(_c("linear", True, dtype=dt, M=m, K=769, N=1031, bias=False, scheme="none"))
    table.append(_c("linear", True, dtype="float32", M=7, K=129, N=389, bias=True, scheme="none"))
    table.append(_c("linear", True, dtype="bfloat16", M=5, K=129, N=389, bias=True, scheme="none"))
    for dt, m in (("bfloat16", 7), ("float32", 33)):
        table.append(_c("linear", dt == "bfloat16", dtype=dt, M=m, K=769, N=1031, bias=False, scheme="int8"))
    table.append(_c("linear", True, dtype="float32", M=5, K=257, N=389, bias=True, scheme="int8"))
    for dt in ("bfloat16", "float32"):
        for scheme in ("fp8_per_tensor", "fp8", "fp8_weight_only"):
            table.append(_c("linear", dt == "bfloat16", dtype=dt, M=33, K=769, N=1031, bias=scheme == "fp8",
                            scheme=scheme))
    # rms_norm: eps over orders of magnitude on inputs whose mean square is near eps (so eps
    # matters), with and without the fused residual
    for dt in DTYPES:
        for fused in (False, True):
            table.append(_c("rms_norm", True, dtype=dt, T=33, H=769 if not fused else 4096, fused=fused,
                            eps=1e-6, x_scale=1.0))
    for dt in ("float32", "bfloat16"):
        for eps, xs in ((1e-6, 1e-3), (1e-3, 0.03), (1e-1, 0.3)):
            for fused in (False, True):
                table.append(_c("rms_norm", True, dtype=dt, T=9, H=257, fused=fused, eps=eps, x_scale=xs))
    table.append(_c("rms_norm", False, dtype="bfloat16", T=257, H=5120, fused=True, eps=1e-5, x_scale=1.0))
    # rotary: neox and gpt-j, every scaling kind, partial rotary, edge and odd positions
    for dt in DTYPES:
        for neox in (True, False):
            table.append(_c("rotary", dt != "float16", dtype=dt, T=33, Hq=8, Hk=2, D=128, rot=128,
                            neox=neox, scaling="llama3" if neox else "none", pos="random"))
    for neox in (True, False):
        table.append(_c("rotary", True, dtype="bfloat16", T=17, Hq=4, Hk=4, D=96, rot=48, neox=neox,
                        scaling="none", pos="random"))
        table.append(_c("rotary", True, dtype="float32", T=15, Hq=4, Hk=2, D=64, rot=32, neox=neox,
                        scaling="none", pos="edges"))
    for scaling in ("linear", "yarn"):
        for neox in (True, False):
            table.append(_c("rotary", True, dtype="float32", T=13, Hq=4, Hk=1, D=64, rot=64, neox=neox,
                            scaling=scaling, pos="random"))
    table.append(_c("rotary", False, dtype="float32", T=33, Hq=4, Hk=1, D=64, rot=64, neox=False,
                    scaling="llama3", pos="random"))
    # silu_and_mul
    for dt in DTYPES:
        table.append(_c("silu_and_mul", True, dtype=dt, T=33, I=1379))
    table.append(_c("silu_and_mul", True, dtype="float32", T=3, I=64))
    table.append(_c("silu_and_mul", False, dtype="bfloat16", T=257, I=5125))
    # write_kv: padding slots (-1) first, last and in the middle
    for dt in DTYPES:
        for bs in (16, 32):
            table.append(_c("write_kv", bs == 16 or dt == "float32", dtype=dt, T=37, Hk=2,
                            D=128 if bs == 16 else 96, bs=bs, pad="ends+middle"))
    table.append(_c("write_kv", True, dtype="float32", T=21, Hk=4, D=64, bs=16, pad="none"))
    # an fp8 (e4m3) cache: bytes exactly as hal/kv_fp8.quantize_kv stores them; a tiny k scale
    # saturates (x / 0.002 passes 448), a large one reaches e4m3's subnormals
    table.append(_c("write_kv", True, dtype="bfloat16", T=37, Hk=2, D=128, bs=16, pad="ends+middle", kv="fp8",
                    kscale=1.0, vscale=1.0))
    table.append(_c("write_kv", True, dtype="float32", T=21, Hk=4, D=64, bs=16, pad="none", kv="fp8",
                    kscale=0.002, vscale=3.1))
    table.append(_c("write_kv", False, dtype="float16", T=37, Hk=2, D=96, bs=32, pad="ends+middle", kv="fp8",
                    kscale=0.37, vscale=8.0))
    # rotary_write_kv: rotary's and write_kv's parameters together (the cache is checked
    # bit-exactly against the k the op left rotated, q and k by NMSE)
    for dt in DTYPES:
        for neox in (True, False):
            table.append(_c("rotary_write_kv", dt != "float16" or neox, dtype=dt, T=33, Hq=8, Hk=2, D=128,
                            rot=128, neox=neox, scaling="llama3" if neox else "none", pos="random", bs=16,
                            pad="ends+middle"))
    for neox in (True, False):
        table.append(_c("rotary_write_kv", True, dtype="bfloat16", T=17, Hq=4, Hk=4, D=96, rot=48, neox=neox,
                        scaling="none", pos="random", bs=32, pad="none"))
    table.append(_c("rotary_write_kv", True, dtype="float32", T=15, Hq=4, Hk=2, D=64, rot=32, neox=False,
                    scaling="yarn", pos="edges", bs=16, pad="ends+middle"))
    table.append(_c("rotary_write_kv", False, dtype="float32", T=13, Hq=4, Hk=1, D=64, rot=64, neox=True,
                    scaling="linear", pos="random", bs=16, pad="ends+middle"))
    table.append(_c("rotary_write_kv", True, dtype="bfloat16", T=37, Hq=8, Hk=2, D=128, rot=128, neox=True,
                    scaling="llama3", pos="random", bs=16, pad="ends+middle", kv="fp8", kscale=0.002, vscale=3.1))
    table.append(_c("rotary_write_kv", True, dtype="float32", T=21, Hq=4, Hk=4, D=64, rot=32, neox=False,
                    scaling="none", pos="random", bs=16, pad="none", kv="fp8", kscale=0.37, vscale=1.0))
    table.append(_c("rotary_write_kv", False, dtype="float16", T=37, Hq=8, Hk=2, D=96, rot=96, neox=True,
                    scaling="none", pos="random", bs=32, pad="ends+middle", kv="fp8", kscale=1.0, vscale=8.0))
    # Qwen3's per-head q/k RMSNorm first: eps over orders of magnitude on inputs whose mean
    # square is near it (x_scale), partial rotary (the dims past rot_dim are normalised too)
    for dt, neox, rot, eps, xs in (("bfloat16", True, 128, 1e-6, 1.0), ("float32", False, 64, 1e-1, 0.3),
                                   ("float16", True, 128, 1e-3, 0.03)):
        table.append(_c("rotary_write_kv", True, dtype=dt, T=9, Hq=8, Hk=2, D=128, rot=rot, neox=neox,
                        scaling="none", pos="random", bs=16, pad="ends+middle", qk_norm=True, eps=eps, x_scale=xs))
    table.append(_c("rotary_write_kv", False, dtype="bfloat16", T=37, Hq=8, Hk=2, D=128, rot=128, neox=True,
                    scaling="llama3", pos="random", bs=16, pad="ends+middle", kv="fp8", kscale=0.5, vscale=2.0,
                    qk_norm=True, eps=1e-6, x_scale=1.0))
    # attention
    configs = [(hq, hk, d, bs) for hq, hk in ((8, 8), (8, 2), (16, 2)) for d in (64, 128, 96) for bs in (16, 32)]
    for scen in ("prefill_cached", "chunked", "decode", "mixed"):
        for hq, hk, d, bs in configs:
            table.append(_c("attention", False, dtype="bfloat16", scenario=scen, Hq=hq, Hk=hk, D=d, bs=bs,
                            scale=1.0, window=None))
        for dt in ("float32", "float16"):
            table.append(_c("attention", False, dtype=dt, scenario=scen, Hq=8, Hk=2, D=128, bs=16, scale=1.0,
                            window=None))
    quick_attn = [("float32", 8, 8, 64, 16), ("bfloat16", 8, 2, 128, 32), ("float16", 16, 2, 96, 16),
                  ("float32", 8, 1, 80, 32)]
    for dt, hq, hk, d, bs in quick_attn:
        table.append(_c("attention", True, dtype=dt, scenario="mixed", Hq=hq, Hk=hk, D=d, bs=bs, scale=1.0,
                        window=None))
    table.append(_c("attention", True, dtype="float32", scenario="prefill_cached", Hq=8, Hk=2, D=64, bs=16,
                    scale=1.0, window=None))
    table.append(_c("attention", False, dtype="float32", scenario="decode", Hq=4, Hk=2, D=64, bs=16,
                    scale=1.0, window=None))
    table.append(_c("attention", False, dtype="float32", scenario="chunked", Hq=4, Hk=2, D=64, bs=16,
                    scale=1.0, window=None))
    # scale is a multiple of 1/sqrt(D): a kernel that ignores it and uses 1/sqrt(D) fails
    for mult in (0.37, 2.5):
        table.append(_c("attention", mult < 1, dtype="float32", scenario="mixed", Hq=4, Hk=2, D=64, bs=16,
                        scale=mult, window=None))
    table.append(_c("attention", True, dtype="bfloat16", scenario="long_decode", Hq=8, Hk=1, D=64, bs=16,
                    scale=1.0, window=None))
    table.append(_c("attention", False, dtype="float32", scenario="long_decode", Hq=32, Hk=8, D=128, bs=16,
                    scale=1.0, window=None))
    # an fp8 cache read with per-layer scales (k's folds into the softmax scale in some kernels:
    # the two differ so a swapped or dropped scale fails)
    for in_quick, dt, scen, hq, hk, d, bs, ks, vs in (
            (True, "bfloat16", "mixed", 8, 2, 128, 16, 0.5, 2.0), (True, "float32", "decode", 8, 8, 64, 16, 1.0, 1.0),
            (True, "float16", "prefill_cached", 16, 2, 96, 32, 3.0, 0.25),
            (False, "bfloat16", "long_decode", 8, 1, 64, 16, 0.8, 1.7),
            (False, "float32", "chunked", 4, 2, 64, 16, 2.5, 0.6)):
        table.append(_c("attention", in_quick, dtype=dt, scenario=scen, Hq=hq, Hk=hk, D=d, bs=bs, scale=1.0,
                        window=None, kv="fp8", kscale=ks, vscale=vs))
    # sliding windows: one token, inside a block, a block, across blocks, and wider than any context
    for window in (1, 7, 16, 24, 500):
        table.append(_c("attention", window in (7, 500), dtype="float32", scenario="sliding", Hq=8, Hk=2, D=64,
                        bs=16, scale=1.0, window=window))
    table.append(_c("attention", True, dtype="bfloat16", scenario="sliding", Hq=8, Hk=2, D=64, bs=32,
                    scale=1.0, window=24))
    # moe: every routing option of MoeSpec
    base = dict(scoring="softmax", renorm=True, groups=1, topk_group=1, bias=False, rsf=1.0)
    for dt in DTYPES:
        for t in (1, 33):
            table.append(_c("moe", t == 33 or dt == "float32", dtype=dt, T=t, E=8, top_k=2, H=256, I=384,
                            scheme="none", **base))
    for dt in ("float32", "bfloat16"):
        table.append(_c("moe", True, dtype=dt, T=33, E=64, top_k=8, H=128, I=96, scheme="none",
                        **{**base, "scoring": "sigmoid", "groups": 8, "topk_group": 4, "bias": True, "rsf": 2.5}))
    small = dict(dtype="float32", T=17, E=8, H=64, I=48, scheme="none")
    table.append(_c("moe", True, top_k=3, **small, **{**base, "renorm": False}))
    table.append(_c("moe", True, top_k=1, **small, **{**base, "scoring": "sigmoid", "rsf": 0.5}))
    table.append(_c("moe", True, top_k=2, **small, **{**base, "scoring": "sigmoid", "renorm": False,
                                                       "bias": True}))
    table.append(_c("moe", True, top_k=2, **small, **{**base, "groups": 4, "topk_group": 1}))
    table.append(_c("moe", True, top_k=2, **small, **{**base, "groups": 4, "topk_group": 2, "bias": True}))
    table.append(_c("moe", False, dtype="bfloat16", T=33, E=8, top_k=2, H=256, I=384, scheme="int8", **base))
    table.append(_c("moe", True, dtype="float32", T=9, E=8, top_k=2, H=64, I=48, scheme="int8", **base))
    # KV block transfers (bit-exact)
    for dt in ("bfloat16", "float32"):
        for direction in ("to_host", "to_device"):
            table.append(_c("swap_blocks", dt == "bfloat16", dtype=dt, direction=direction, n=5))
        table.append(_c("copy_blocks", dt == "bfloat16", dtype=dt, layers=3, n=6))
    table.append(_c("swap_blocks", True, dtype="float32", direction="to_device", n=1))
    table.append(_c("copy_blocks", True, dtype="float32", layers=1, n=2))
    # an fp8 cache's blocks move as bytes (offload, prefix reuse)
    for direction in ("to_host", "to_device"):
        table.append(_c("swap_blocks", True, dtype="bfloat16", direction=direction, n=5, kv="fp8"))
    table.append(_c("copy_blocks", True, dtype="bfloat16", layers=3, n=6, kv="fp8"))
    # sampling: every SamplingTensors field varied; seeds and steps per row
    table.append(_c("sample", True, kind="greedy", B=8, V=5003))
    table.append(_c("sample", True, kind="mixed", B=8, V=5003))
    for kind in ("top_k", "top_p", "min_p", "combined"):
        table.append(_c("sample", False, kind=kind, B=4096, V=160))
        # CI size: a quarter of the draws still gives the chi-square test its power on a
        # narrower vocabulary, and keeps interpreted kernels (one program per row) quick
        table.append(_c("sample", True, kind=kind, B=1024, V=48))
    table.append(_c("sample", True, kind="rows", B=1024, V=48))
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


# The float64 references are slow (plain loops by design) and depend only on the inputs,
# which are the same for every backend that shares the default layouts: a run over many
# backends (the mutation corpus) computes each once. Keyed by a hash of the input bytes.
_REF_CACHE: dict = {}


def _key_part(a) -> Any:
    import hashlib

    if isinstance(a, torch.Tensor):
        t = a.detach().cpu().contiguous()
        return (str(t.dtype), tuple(t.shape), hashlib.blake2b(_bits(t).numpy().tobytes(), digest_size=16).digest()
                if t.numel() else b"")
    if isinstance(a, (list, tuple)):
        return tuple(_key_part(x) for x in a)
    if hasattr(a, "__dataclass_fields__"):
        return (type(a).__name__,) + tuple(_key_part(getattr(a, f)) for f in a.__dataclass_fields__)
    return repr(a)


def _ref(fn: Callable, *args):
    key = (fn.__name__, _key_part(args))
    if key not in _REF_CACHE:
        if len(_REF_CACHE) > 512:
            _REF_CACHE.clear()
        _REF_CACHE[key] = fn(*args)
    return _REF_CACHE[key]



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
# on the CPU (same values on every device) and moved to the backend's device. Every runner
# calls the op twice on fresh copies of the inputs: the ENGINE form (no out=, the tensors and
# strides halserve/models/layers.py passes) and the OUT form (out= inside NaN guards); both
# are compared with the float64 reference and with each other.

def _engine_ret(ret, shape: tuple[int, ...], dtype: torch.dtype, dev, what: str = "the result") -> list[str]:
    """Errors when the engine form's return value is not a new tensor of the right kind."""
    if not isinstance(ret, torch.Tensor):
        return [f"without out= it returned {type(ret).__name__}, not a tensor"]
    errs = []
    if tuple(ret.shape) != tuple(shape):
        errs.append(f"without out= {what} has shape {tuple(ret.shape)}, expected {tuple(shape)}")
    if ret.dtype != dtype:
        errs.append(f"without out= {what} has dtype {ret.dtype}, expected {dtype}")
    if ret.device.type != torch.device(dev).type:
        errs.append(f"without out= {what} is on {ret.device}, expected {dev}")
    return errs


def _forms_agree(op: str, dtype: str, engine: torch.Tensor, out: torch.Tensor, limit: float) -> list[str]:
    """The two call forms must agree to within the op's limit (they compute the same thing)."""
    if engine.shape != out.shape:
        return []  # already reported
    d = R.nmse(engine, out.to(engine.dtype)) if torch.isfinite(out.float()).all() else math.inf
    if not d <= limit:
        return [f"the engine form (no out=) and the out= form disagree: NMSE {d:.2e} between them"]
    return []


def _pack_cpu(pw: PackedWeight) -> PackedWeight:
    return PackedWeight(pw.weight.cpu(), pw.scheme, None if pw.scale is None else pw.scale.cpu(),
                        pw.act_scheme, pw.out_features, pw.in_features)


def _run_linear(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    m, k, n = p["M"], p["K"], p["N"]
    scheme = p.get("scheme", "none")
    x = _randn(g, m, k).to(dt)
    w = _randn(g, n, k, scale=k ** -0.5).to(dt)
    bias = _randn(g, n).to(dt) if p.get("bias") else None
    pw = b.pack_weight(w.to(dev), scheme)
    pw_cpu = _pack_cpu(pw)
    errors: list[str] = []
    if scheme != "none":
        if tuple(pw.weight.shape) != (n, k):
            errors.append(f"pack_weight gave weight shape {tuple(pw.weight.shape)}, expected {(n, k)}")
        else:
            limit = PACK_LIMITS[pw.scheme]
            q_err = R.nmse(R.dequantize(pw_cpu), w)
            if not q_err <= limit:
                errors.append(f"pack_weight({scheme}) dequantizes to NMSE {q_err:.2e} vs the weight (> {limit})")
    ref = R.linear(x, pw_cpu, bias)
    limit = _limit("linear", p["dtype"], scheme)
    xd, bd = x.to(dev), None if bias is None else bias.to(dev)
    eng = b.linear(xd, pw, bd)  # the engine form: positional, no out=
    errors += _engine_ret(eng, (m, n), dt, dev)
    out, buf = _guarded((m, n), dt, dev)
    ret = b.linear(xd, pw, bd, out=out)
    b.synchronize()
    errors += _guard_errors(buf, out.numel()) + _returned(ret, out) + _unchanged(xd, x, "x")
    value = R.nmse(out, ref)
    if isinstance(eng, torch.Tensor):
        value = max(value, R.nmse(eng, ref))
        errors += _forms_agree("linear", p["dtype"], eng, out, limit)
    wbytes = n * k * (1 if scheme != "none" else _esize(p["dtype"]))
    return Outcome("nmse", value, limit, errors,
                   timer=lambda: b.linear(xd, pw, bd, out=out), flops=2.0 * m * n * k,
                   bytes=wbytes + (m * k + m * n) * _esize(p["dtype"]))


def _run_rms_norm(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    t, h, eps = p["T"], p["H"], p.get("eps", 1e-6)
    xs = p.get("x_scale", 1.0)
    x = _randn(g, t, h, scale=xs).to(dt)
    w = (1 + 0.1 * _randn(g, h)).to(dt)
    res = _randn(g, t, h, scale=xs).to(dt) if p["fused"] else None
    limit = _limit("rms_norm", p["dtype"])
    wd = w.to(dev)
    errors: list[str] = []
    ref = _ref(R.rms_norm, x, w, eps, res)
    values = []
    # engine form: RMSNorm.__call__ passes residual positionally and takes (out, h) back
    xe, re_ = x.to(dev), None if res is None else res.to(dev)
    eng = b.rms_norm(xe, wd, eps, re_)
    if res is None:
        errors += _engine_ret(eng, (t, h), dt, dev)
        eng_y = eng if isinstance(eng, torch.Tensor) else None
        if eng_y is not None:
            values.append(R.nmse(eng_y, ref))
    else:
        eng_y = None
        if not (isinstance(eng, tuple) and len(eng) == 2):
            errors.append("with residual and no out= it must return (out, x + residual)")
        else:
            errors += _engine_ret(eng[0], (t, h), dt, dev, "out") + _engine_ret(eng[1], (t, h), dt, dev, "h")
            eng_y = eng[0]
            values += [R.nmse(eng[0], ref[0]), R.nmse(eng[1], ref[1])]
    # out form
    xd, rd = x.to(dev), None if res is None else res.to(dev)
    out, buf = _guarded((t, h), dt, dev)
    ret = b.rms_norm(xd, wd, eps, residual=rd, out=out)
    b.synchronize()
    errors += _guard_errors(buf, out.numel()) + _unchanged(xd, x, "x")
    if res is None:
        errors += _returned(ret, out)
        values.append(R.nmse(out, ref))
    else:
        if not (isinstance(ret, tuple) and len(ret) == 2):
            return Outcome("nmse", math.inf, 1, errors + ["with residual it must return (out, x + residual)"])
        errors += _returned(ret[0], out)
        if _mismatches(rd, res) and _mismatches(rd, ret[1]):
            errors.append("modified residual to something other than x + residual")
        values += [R.nmse(out, ref[0]), R.nmse(ret[1], ref[1])]
    if isinstance(eng_y, torch.Tensor):
        errors += _forms_agree("rms_norm", p["dtype"], eng_y, out, limit)
    nbytes = t * h * _esize(p["dtype"]) * (4 if res is not None else 2)
    return Outcome("nmse", max(values), limit, errors,
                   timer=lambda: b.rms_norm(xd, wd, eps, residual=rd, out=out), flops=4.0 * t * h, bytes=nbytes)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
ROPE_SCALINGS: dict[str, dict | None] = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": LLAMA3_SCALING,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
}
ROPE_MAX_POS = 32768


def _positions(p: dict, g: torch.Generator, t: int) -> torch.Tensor:
    if p.get("pos", "random") == "edges":  # 0, the last position, and odd ones between
        mid = torch.randint(0, ROPE_MAX_POS // 2, (t - 2,), generator=g) * 2 + 1
        return torch.cat([torch.tensor([0, ROPE_MAX_POS - 1]), mid])
    return torch.randint(0, ROPE_MAX_POS, (t,), generator=g)


def _run_rotary(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    from halserve.hal.rope import build_rope_cache

    dt = DTYPES[p["dtype"]]
    t, hq, hk, d, rot = p["T"], p["Hq"], p["Hk"], p["D"], p["rot"]
    cache = build_rope_cache(d, rot, ROPE_MAX_POS, 500000.0, ROPE_SCALINGS[p["scaling"]])
    pos = _positions(p, g, t)
    width = (hq + 2 * hk) * d
    qkv0 = _randn(g, t, width).to(dt)
    q0, k0 = qkv0[:, :hq * d].view(t, hq, d), qkv0[:, hq * d:(hq + hk) * d].view(t, hk, d)
    rq, rk = _ref(R.rotary, pos, q0, k0, cache, p["neox"])
    pd, cd = pos.to(dev), cache.to(dev)
    limit = _limit("rotary", p["dtype"])
    # engine form: Attention.__call__ passes contiguous q [T, Hq, D] and k [T, Hk, D]
    qe, qbuf = _guarded((t, hq, d), dt, dev, fill=q0.to(dev))
    ke, kbuf = _guarded((t, hk, d), dt, dev, fill=k0.to(dev))
    b.rotary(pd, qe, ke, cd, p["neox"])
    b.synchronize()
    errors = _guard_errors(qbuf, qe.numel(), "q") + _guard_errors(kbuf, ke.numel(), "k")
    values = [R.nmse(qe, rq), R.nmse(ke, rk)]
    if rot < d:
        errors += _unchanged(qe[..., rot:], q0[..., rot:], "q past rot_dim")
        errors += _unchanged(ke[..., rot:], k0[..., rot:], "k past rot_dim")
    # strided form: q and k as views of one fused qkv row, as a kernel author may be handed
    # them; a backend that needs contiguous tensors says so in supports()
    qkv, buf = _guarded((t, width), dt, dev, fill=qkv0.to(dev))
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    b.rotary(pd, q, k, cd, p["neox"])
    b.synchronize()
    errors += _guard_errors(buf, qkv.numel(), "qkv")
    errors += _unchanged(qkv[:, (hq + hk) * d:], qkv0[:, (hq + hk) * d:], "v (next to k in qkv)")
    values += [R.nmse(q, rq), R.nmse(k, rk)]
    errors += _forms_agree("rotary", p["dtype"], qe, q, limit)
    nbytes = 2 * t * (hq + hk) * rot * _esize(p["dtype"]) + t * rot * 4
    return Outcome("nmse", max(values), limit, errors,
                   timer=lambda: b.rotary(pd, q, k, cd, p["neox"]), flops=3.0 * t * (hq + hk) * rot,
                   bytes=nbytes)


def _run_silu_and_mul(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    t, i = p["T"], p["I"]
    x = _randn(g, t, 2 * i).to(dt)
    ref = R.silu_and_mul(x)
    limit = _limit("silu_and_mul", p["dtype"])
    eng = b.silu_and_mul(x.to(dev))
    errors = _engine_ret(eng, (t, i), dt, dev)
    xd = x.to(dev)
    out, buf = _guarded((t, i), dt, dev)
    ret = b.silu_and_mul(xd, out=out)
    b.synchronize()
    errors += _guard_errors(buf, out.numel()) + _returned(ret, out) + _unchanged(xd, x, "x")
    value = R.nmse(out, ref)
    if isinstance(eng, torch.Tensor):
        value = max(value, R.nmse(eng, ref))
        errors += _forms_agree("silu_and_mul", p["dtype"], eng, out, limit)
    return Outcome("nmse", value, limit, errors,
                   timer=lambda: b.silu_and_mul(xd, out=out), flops=5.0 * t * i,
                   bytes=3 * t * i * _esize(p["dtype"]))


def _stacked(shape: tuple[int, ...], dt: torch.dtype, dev, fill: torch.Tensor, layers: int = 3):
    """The engine's KV cache: one tensor [layers, *shape]; layer 1's view is what an op gets.
    Returns (view, stacked, index of the layer)."""
    stack, buf = _guarded((layers, *shape), dt, dev)
    for i in range(layers):
        stack[i].copy_(fill.to(dev) if i == 1 else torch.full_like(stack[i], -7.0))
    return stack[1], stack, buf


def _neighbours_untouched(stack: torch.Tensor, what: str) -> list[str]:
    for i in (0, stack.shape[0] - 1):
        if not bool((stack[i] == -7.0).all()):
            return [f"wrote into layer {i} of the stacked KV cache (outside the {what} it was given)"]
    return []


def _run_write_kv(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    t, hk, d, bs = p["T"], p["Hk"], p["D"], p["bs"]
    nblocks = 9
    shape = _kv_shape(b, nblocks, bs, hk, d)
    cdt, scales = _kv_case(p, dt)
    cache0 = _randn(g, *shape).to(cdt)
    key, val = _randn(g, t, hk, d).to(dt), _randn(g, t, hk, d).to(dt)
    slots = torch.randperm(nblocks * bs, generator=g)[:t]
    if p.get("pad", "ends+middle") != "none":
        pad = torch.rand(t, generator=g) < 0.25
        pad[0] = pad[-1] = pad[t // 2] = True
        slots = torch.where(pad, torch.full_like(slots, -1), slots)
    if scales:  # what an fp8 cache must hold: the storage rule's bytes, scattered
        ref = _ref(R.write_kv, quantize_kv(key, scales["k_scale"]), quantize_kv(val, scales["v_scale"]), cache0, slots)
    else:
        ref = _ref(R.write_kv, key, val, cache0, slots)
    kd, vd, sd = key.to(dev), val.to(dev), slots.to(dev)
    dt = cdt
    # engine form: layer 1 of a stacked [L, *shape] cache
    view, stack, sbuf = _stacked(shape, dt, dev, cache0)
    b.write_kv(kd, vd, view, sd, **scales)
    b.synchronize()
    errors = _guard_errors(sbuf, stack.numel(), "the stacked kv cache") + _neighbours_untouched(stack, "layer")
    n = _mismatches(view, ref)
    cache, buf = _guarded(shape, dt, dev, fill=cache0.to(dev))
    b.write_kv(kd, vd, cache, sd, **scales)
    b.synchronize()
    errors += _guard_errors(buf, cache.numel(), "kv_cache") + _unchanged(kd, key, "key") + _unchanged(vd, val, "value")
    n += _mismatches(cache, ref)
    return Outcome("exact", n, 0, errors, timer=lambda: b.write_kv(kd, vd, cache, sd, **scales),
                   bytes=2.0 * t * hk * d * (_esize(p["dtype"]) + cdt.itemsize))


def _run_rotary_write_kv(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    """q and k by NMSE against the float64 rotation; the cache bit-exactly against write_kv's
    rule applied to the k the op left (as rotated and stored) and v; both call forms."""
    from halserve.hal.rope import build_rope_cache

    dt = DTYPES[p["dtype"]]
    t, hq, hk, d, rot, bs, neox = p["T"], p["Hq"], p["Hk"], p["D"], p["rot"], p["bs"], p["neox"]
    cache = build_rope_cache(d, rot, ROPE_MAX_POS, 500000.0, ROPE_SCALINGS[p["scaling"]])
    pos = _positions(p, g, t)
    width = (hq + 2 * hk) * d
    qkv0 = _randn(g, t, width, scale=p.get("x_scale", 1.0)).to(dt)
    q0, k0 = qkv0[:, :hq * d].view(t, hq, d), qkv0[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v0 = qkv0[:, (hq + hk) * d:].view(t, hk, d)
    norm: dict = {}
    if p.get("qk_norm"):  # Qwen3: rms_norm of each head row, then rotary
        qw, kw = (_randn(g, d, scale=0.5).add(1.0).to(dt) for _ in range(2))
        eps = p["eps"]
        qn = R.rms_norm(q0.reshape(-1, d), qw, eps).view(t, hq, d)
        kn = R.rms_norm(k0.reshape(-1, d), kw, eps).view(t, hk, d)
        rq, rk = _ref(R.rotary, pos, qn, kn, cache, neox)
        norm = {"q_norm_weight": qw.to(dev), "k_norm_weight": kw.to(dev), "norm_eps": eps}
    else:
        rq, rk = _ref(R.rotary, pos, q0, k0, cache, neox)
    nblocks = 9
    shape = _kv_shape(b, nblocks, bs, hk, d)
    cdt, scales = _kv_case(p, dt)
    cache0 = _randn(g, *shape).to(cdt)
    slots = torch.randperm(nblocks * bs, generator=g)[:t]
    if p.get("pad", "ends+middle") != "none":
        pad = torch.rand(t, generator=g) < 0.25
        pad[0] = pad[-1] = pad[t // 2] = True
        slots = torch.where(pad, torch.full_like(slots, -1), slots)
    pd, cd, sd = pos.to(dev), cache.to(dev), slots.to(dev)
    limit = _limit("rotary_write_kv", p["dtype"])

    def want(k_after: torch.Tensor) -> torch.Tensor:
        kk, vv = k_after.cpu(), v0
        if scales:
            kk, vv = quantize_kv(kk, scales["k_scale"]), quantize_kv(vv, scales["v_scale"])
        return R.write_kv(kk, vv, cache0, slots)

    # engine form: contiguous q, k, v and layer 1 of a stacked cache (Attention.__call__)
    qe, qbuf = _guarded((t, hq, d), dt, dev, fill=q0.to(dev))
    ke, kbuf = _guarded((t, hk, d), dt, dev, fill=k0.to(dev))
    ve, vbuf = _guarded((t, hk, d), dt, dev, fill=v0.to(dev))
    view, stack, sbuf = _stacked(shape, cdt, dev, cache0)
    b.rotary_write_kv(pd, qe, ke, ve, cd, neox, view, sd, **scales, **norm)
    b.synchronize()
    errors = (_guard_errors(qbuf, qe.numel(), "q") + _guard_errors(kbuf, ke.numel(), "k")
              + _guard_errors(sbuf, stack.numel(), "the stacked kv cache") + _neighbours_untouched(stack, "layer")
              + _guard_errors(vbuf, ve.numel(), "v") + _unchanged(ve, v0, "v"))
    values = [R.nmse(qe, rq), R.nmse(ke, rk)]
    n = _mismatches(view, want(ke))
    if rot < d and not norm:
        errors += _unchanged(qe[..., rot:], q0[..., rot:], "q past rot_dim")
        errors += _unchanged(ke[..., rot:], k0[..., rot:], "k past rot_dim")
    # strided form: q, k, v as views of one fused qkv row (a backend that needs contiguous
    # tensors says so in supports())
    qkv, buf = _guarded((t, width), dt, dev, fill=qkv0.to(dev))
    q, k = qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    kvc, cbuf = _guarded(shape, cdt, dev, fill=cache0.to(dev))
    b.rotary_write_kv(pd, q, k, v, cd, neox, kvc, sd, **scales, **norm)
    b.synchronize()
    errors += _guard_errors(buf, qkv.numel(), "qkv") + _guard_errors(cbuf, kvc.numel(), "kv_cache")
    errors += _unchanged(v, v0, "v (in qkv)")
    values += [R.nmse(q, rq), R.nmse(k, rk)]
    n += _mismatches(kvc, want(k))
    errors += _forms_agree("rotary_write_kv", p["dtype"], qe, q, limit)
    errors += _forms_agree("rotary_write_kv", p["dtype"], ke, k, limit)
    if n:
        errors.append(f"{n} cache elements differ from write_kv of the rotated k and v")
    nbytes = (2 * t * (hq + hk) * rot + 2 * t * hk * d) * _esize(p["dtype"]) + t * rot * 4 \
        + 2 * t * hk * d * cdt.itemsize
    return Outcome("nmse", max(values), limit, errors,
                   timer=lambda: b.rotary_write_kv(pd, q, k, v, cd, neox, kvc, sd, **scales, **norm),
                   flops=3.0 * t * (hq + hk) * rot, bytes=nbytes)


def _kv_case(p: dict, dt: torch.dtype) -> tuple[torch.dtype, dict]:
    """A case's cache dtype and the scale arguments the engine passes with it (an fp8
    cache only: ``kv``, ``kscale``, ``vscale``)."""
    if p.get("kv", "auto") == "auto":
        return dt, {}
    return FP8_DTYPE, {"k_scale": p["kscale"], "v_scale": p["vscale"]} if "kscale" in p else {}


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
    scale = p.get("scale", 1.0) * p["D"] ** -0.5
    kvdt, scales = _kv_case(p, dt)
    if scales:  # the reference reads what the fp8 bytes mean: stored * scale, in float64
        kv = kv.to(kvdt)
        deq = torch.stack([kv[0].double() * scales["k_scale"], kv[1].double() * scales["v_scale"]])
        ref = _ref(R.attention, q, deq, meta, scale)
    else:
        ref = _ref(R.attention, q, kv, meta, scale)
    limit = _limit("attention", p["dtype"])
    qd, md = q.to(dev), _meta_to(meta, dev)
    # engine form: layer 1 of a stacked cache, no out=, a new tensor back
    view, stack, sbuf = _stacked(tuple(kv.shape), kvdt, dev, kv)
    eng = b.attention(qd, view, md, scale, **scales)
    b.synchronize()
    errors = _engine_ret(eng, tuple(q.shape), dt, dev) + _guard_errors(sbuf, stack.numel(), "the stacked kv cache")
    errors += _neighbours_untouched(stack, "layer") + _unchanged(view, kv, "kv_cache")
    kvd = kv.to(dev)
    out, buf = _guarded(tuple(q.shape), dt, dev)
    ret = b.attention(qd, kvd, md, scale, out=out, **scales)
    b.synchronize()
    errors += (_guard_errors(buf, out.numel()) + _returned(ret, out) + _unchanged(qd, q, "q")
               + _unchanged(kvd, kv, "kv_cache"))
    value = R.nmse(out, ref)
    if isinstance(eng, torch.Tensor):
        value = max(value, R.nmse(eng, ref))
        errors += _forms_agree("attention", p["dtype"], eng, out, limit)
    win = p.get("window") or 1 << 30
    ctx = sum(min(s - ql + j + 1, win) for s, ql in zip(meta.seq_lens_host, meta.query_lens_host)
              for j in range(ql))
    kv_read = sum(meta.seq_lens_host) * p["Hk"] * p["D"] * 2
    return Outcome("nmse", value, limit, errors,
                   timer=lambda: b.attention(qd, kvd, md, scale, out=out, **scales),
                   flops=4.0 * ctx * p["Hq"] * p["D"], bytes=kv_read * kvdt.itemsize + 2 * q.numel() * _esize(p["dtype"]))


def moe_spec(p: dict, g: torch.Generator) -> MoeSpec:
    """The MoeSpec of a case (correction bias drawn from ``g``)."""
    return MoeSpec(top_k=p["top_k"], scoring=p.get("scoring", "softmax"), renormalize=p.get("renorm", True),
                   num_expert_group=p.get("groups", 1), topk_group=p.get("topk_group", 1),
                   correction_bias=_randn(g, p["E"], scale=0.3) if p.get("bias") else None,
                   routed_scaling_factor=p.get("rsf", 1.0))


def _run_moe(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    dt = DTYPES[p["dtype"]]
    t, e, h, inter = p["T"], p["E"], p["H"], p["I"]
    x = _randn(g, t, h).to(dt)
    logits = _randn(g, t, e)
    w13 = _randn(g, e, 2 * inter, h, scale=h ** -0.5).to(dt)
    w2 = _randn(g, e, h, inter, scale=inter ** -0.5).to(dt)
    spec = moe_spec(p, g)
    spec_d = MoeSpec(spec.top_k, spec.scoring, spec.renormalize, spec.num_expert_group, spec.topk_group,
                     None if spec.correction_bias is None else spec.correction_bias.to(dev),
                     spec.routed_scaling_factor)
    scheme = p.get("scheme", "none")
    p13, p2 = b.pack_weight(w13.to(dev), scheme), b.pack_weight(w2.to(dev), scheme)
    ref = _ref(R.moe, x, logits, _pack_cpu(p13), _pack_cpu(p2), spec)
    limit = _limit("moe", p["dtype"], scheme)
    xd, ld = x.to(dev), logits.to(dev)
    eng = b.moe(xd, ld, p13, p2, spec_d)
    errors = _engine_ret(eng, (t, h), dt, dev)
    out, buf = _guarded((t, h), dt, dev)
    ret = b.moe(xd, ld, p13, p2, spec_d, out=out)
    b.synchronize()
    errors += _guard_errors(buf, out.numel()) + _returned(ret, out) + _unchanged(xd, x, "x")
    value = R.nmse(out, ref)
    if isinstance(eng, torch.Tensor):
        value = max(value, R.nmse(eng, ref))
        errors += _forms_agree("moe", p["dtype"], eng, out, limit)
    used = min(e, t * p["top_k"])
    wbytes = used * 3 * h * inter * (1 if scheme != "none" else _esize(p["dtype"]))
    return Outcome("nmse", value, limit, errors,
                   timer=lambda: b.moe(xd, ld, p13, p2, spec_d, out=out),
                   flops=2.0 * t * p["top_k"] * 3 * h * inter, bytes=wbytes)


def _block_caches(b: Backend, p: dict, g: torch.Generator, nblocks: int):
    dt = _kv_case(p, DTYPES[p["dtype"]])[0]
    return _randn(g, *_kv_shape(b, nblocks, 16, 2, 64)).to(dt)


def _blocks_of(cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """cache[:, ids], through a byte view for one-byte dtypes (torch 2.6, the riscv64
    userland's, cannot index float8 tensors on the CPU)."""
    if cache.element_size() == 1 and cache.dtype != torch.uint8:
        return cache.view(torch.uint8)[:, ids].view(cache.dtype)
    return cache[:, ids]


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
    # the engine form (engine/offload.py): a staging buffer [n, 2, ...] passed transposed,
    # so one side is a strided view, with rows 0..n-1 of the mapping on the staging side
    ids = mapping[:, 1 if p["direction"] == "to_host" else 0]
    rows = torch.arange(n)
    if p["direction"] == "to_host":  # device cache -> staging rows
        stage, sbuf = _guarded((n, *src0.shape[:1], *src0.shape[2:]), src0.dtype, "cpu")
        emap = torch.stack([mapping[:, 0], rows], dim=1)
        b.swap_blocks(src, stage.transpose(0, 1), emap)
        b.synchronize()
        errors += _guard_errors(sbuf, stage.numel(), "the staging buffer")
        n_bad += _mismatches(stage.transpose(0, 1), _blocks_of(src0, mapping[:, 0]))
    else:  # staging rows -> device cache
        stage = _blocks_of(src0, ids).transpose(0, 1).contiguous()
        dst2, buf2 = _guarded(tuple(dst0.shape), dst0.dtype, dev, fill=dst0.to(dev))
        emap = torch.stack([rows, mapping[:, 1]], dim=1)
        b.swap_blocks(stage.transpose(0, 1), dst2, emap)
        b.synchronize()
        errors += _guard_errors(buf2, dst2.numel(), "dst")
        n_bad += _mismatches(dst2, R.swap_blocks(src0, dst0, mapping))
    block_bytes = src0[:, 0].numel() * src0.element_size()
    return Outcome("exact", n_bad, 0, errors, timer=lambda: b.swap_blocks(src, dst, mapping),
                   bytes=2.0 * n * block_bytes)


def _run_copy_blocks(b: Backend, p: dict, g: torch.Generator, dev) -> Outcome:
    caches0 = [_block_caches(b, p, g, 12) for _ in range(p["layers"])]
    # sources and destinations are disjoint: chained copies are not part of the contract
    perm = torch.randperm(12, generator=g)
    n = p["n"]
    mapping = torch.stack([perm[:n], perm[n:2 * n]], dim=1)
    expected = R.copy_blocks(caches0, mapping)
    pairs = [_guarded(tuple(c.shape), c.dtype, dev, fill=c.to(dev)) for c in caches0]
    caches = [c for c, _ in pairs]
    b.copy_blocks(caches, mapping)
    b.synchronize()
    errors = []
    for i, (c, buf) in enumerate(pairs):
        errors += _guard_errors(buf, c.numel(), f"kv_caches[{i}]")
    n_bad = sum(_mismatches(c, e) for c, e in zip(caches, expected))
    # the engine form: every layer a view of one stacked cache
    stack, sbuf = _guarded((len(caches0), *caches0[0].shape), caches0[0].dtype, dev,
                           fill=torch.stack(caches0).to(dev))
    b.copy_blocks(list(stack.unbind(0)), mapping)
    b.synchronize()
    errors += _guard_errors(sbuf, stack.numel(), "the stacked kv cache")
    n_bad += sum(_mismatches(stack[i], e) for i, e in enumerate(expected))
    block_bytes = caches0[0][:, 0].numel() * caches0[0].element_size()
    return Outcome("exact", n_bad, 0, errors, timer=lambda: b.copy_blocks(caches, mapping),
                   bytes=2.0 * n * block_bytes * len(caches))


SAMPLE_KINDS = {
    "top_k": dict(temperature=1.0, top_k=9),
    "top_p": dict(temperature=0.8, top_p=0.7),
    "min_p": dict(temperature=1.2, min_p=0.08),
    "combined": dict(temperature=0.7, top_k=25, top_p=0.9, min_p=0.02),
}
# "rows": row r uses the parameters of group r % 4, so a kernel that reads one row's
# parameters for another (or skips a filter on some rows) fails that group's chi-square
ROW_GROUPS = list(SAMPLE_KINDS.values())
# what each kind sets, per SamplingTensors field (for the coverage meta-test)
SAMPLE_FIELDS: dict[str, dict[str, Any]] = {
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seeds="per row", steps="per row"),
    "mixed": dict(temperature="0 / 0.9 / 1.3 by row", top_k="0 / 5 by row", top_p=1.0, min_p=0.0,
                  seeds="per row", steps="per row"),
    **{k: {"top_k": 0, "top_p": 1.0, "min_p": 0.0, **v, "seeds": "3 per step", "steps": "per 3 rows"}
       for k, v in SAMPLE_KINDS.items()},
    "rows": dict(temperature="by group", top_k="by group", top_p="by group", min_p="by group",
                 seeds="3 per step", steps="per 3 rows"),
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


def _row_params(kind: str, bsz: int) -> dict[str, torch.Tensor]:
    """Per-row field tensors of a random-sampling case (seeds/steps excluded)."""
    groups = ROW_GROUPS if kind == "rows" else [SAMPLE_KINDS[kind]]
    idx = torch.arange(bsz) % len(groups)
    out = {}
    for f, dflt in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
        vals = torch.tensor([float(gr.get(f, dflt)) for gr in groups])
        out[f] = vals[idx]
    return out


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


def _with(params: SamplingTensors, **kw) -> SamplingTensors:
    from dataclasses import replace

    return replace(params, **kw)


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
        params = sampling_tensors(bsz, **_row_params(kind, bsz),
                                  seeds=torch.full((bsz,), 1234) + torch.arange(bsz) % 3,
                                  steps=torch.arange(bsz) // 3, device=dev)
    cpu_params = SamplingTensors(*(getattr(params, f).cpu() for f in
                                   ("temperature", "top_k", "top_p", "min_p", "seeds", "steps")))
    if kind in ("greedy", "mixed"):
        target = _ref(R.sampling_probs, logits, cpu_params)  # [B, V]
    else:  # every row has the same logits: one row per parameter group, then broadcast
        groups = len(ROW_GROUPS) if kind == "rows" else 1
        few = SamplingTensors(*(getattr(cpu_params, f)[:groups] for f in
                                ("temperature", "top_k", "top_p", "min_p", "seeds", "steps")))
        target = _ref(R.sampling_probs, logits[:groups], few)[torch.arange(bsz) % groups]
    ld = logits.to(dev)
    eng = b.sample(ld, params)  # the engine form: no out=
    errors += _engine_ret(eng, (bsz,), torch.int64, dev)
    out, buf = _guarded((bsz,), torch.int64, dev)
    ret = b.sample(ld, params, out=out)
    b.synchronize()
    errors += _guard_errors(buf, bsz) + _returned(ret, out) + _unchanged(ld, logits, "logits")
    tokens = out.cpu()
    if isinstance(eng, torch.Tensor) and eng.shape == out.shape and not torch.equal(eng.cpu(), tokens):
        errors.append("the engine form (no out=) and the out= form drew different tokens from the same seeds")
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
    outside = int((target.gather(1, tokens[:, None]) == 0).sum())
    if outside:
        errors.append(f"{outside}/{bsz} draws outside the allowed set")
    again = torch.empty_like(out)
    b.sample(ld, params, out=again)
    if not torch.equal(again.cpu(), tokens):
        errors.append("not reproducible: the same seeds and steps gave different tokens")
    # the draw of row b depends on seeds[b] and steps[b]: moving either must move the draws
    # (about as often as two independent draws differ), and reversing the batch must only
    # reverse them
    collide = float((target * target).sum(-1).mean())
    for what, changed in (("seeds", _with(params, seeds=params.seeds + 1)),
                          ("steps", _with(params, steps=params.steps + 1))):
        same = float((b.sample(ld, changed).cpu() == tokens).double().mean())
        if same > collide + 0.1:
            errors.append(f"changing {what} left {same:.0%} of draws unchanged (independent draws: "
                          f"{collide:.0%}): {what} ignored?")
    flip = SamplingTensors(*(getattr(params, f).flip(0) for f in
                             ("temperature", "top_k", "top_p", "min_p", "seeds", "steps")),
                           params.all_greedy, params.all_random, params.no_top_k, params.no_top_p, params.no_min_p)
    rev = b.sample(ld.flip(0).contiguous(), flip).cpu()
    if not torch.equal(rev.flip(0), tokens):
        errors.append("a row drew a different token when the batch was reversed (rows depend on each other)")
    for r in (0, 1, bsz - 1):
        one = _with(params, **{f: getattr(params, f)[r:r + 1] for f in
                               ("temperature", "top_k", "top_p", "min_p", "seeds", "steps")})
        alone = b.sample(ld[r:r + 1], one)
        if int(alone.reshape(-1)[0]) != int(tokens[r]):
            errors.append(f"row {r} drew a different token alone than in the batch")
            break
    groups = len(ROW_GROUPS) if kind == "rows" else 1
    z = max(chi2_z(torch.bincount(tokens[i::groups], minlength=v), target[i]) for i in range(groups))
    return Outcome("chi2_z", z, SAMPLE_Z_LIMIT, errors, timer=timer, bytes=nbytes)


RUNNERS: dict[str, Callable[[Backend, dict, torch.Generator, Any], Outcome]] = {
    "linear": _run_linear, "rms_norm": _run_rms_norm, "rotary": _run_rotary, "silu_and_mul": _run_silu_and_mul,
    "write_kv": _run_write_kv, "rotary_write_kv": _run_rotary_write_kv, "attention": _run_attention,
    "moe": _run_moe, "swap_blocks": _run_swap_blocks,
    "copy_blocks": _run_copy_blocks, "sample": _run_sample,
}
assert set(RUNNERS) == set(OPS), "every HAL op needs a conformance runner"

# ---- coverage: which case parameter varies which op argument -------------------------------
# op -> {argument: case parameter | callable(params) -> value | "exempt: why"}. Arguments are
# the op's parameters (inspect.signature of Backend.<op>) and, for a dataclass argument, its
# fields as "arg.field". test_meta.py fails when an argument has no entry, or when its entry
# takes one value only over the op's quick cases: a new parameter cannot go untested.
_FORMS = "exempt: every case runs both with out= (guarded) and without it (the engine's form)"
_PACKED = {"weight": "N", "scheme": "scheme", "scale": "scheme", "act_scheme": "scheme",
           "out_features": "N", "in_features": "K",
           "extra": "exempt: backend-private layouts, made by the backend's own pack_weight in every case"}
_META = {"cu_seqlens_q": "scenario", "seq_lens": "scenario", "block_tables": "scenario",
         "slot_mapping": "exempt: attention does not read it (write_kv does, varied there)",
         "max_seqlen_q": "scenario", "max_seqlen_k": "scenario", "query_lens_host": "scenario",
         "seq_lens_host": "scenario", "block_size": "bs", "num_decode_seqs": "scenario",
         "sliding_window": "window",
         "layer_ready": "exempt: stream markers the model waits on before a layer; no op reads them"}


def _sample_field(f: str):
    return lambda p: str(SAMPLE_FIELDS[p["kind"]][f])


COVERAGE: dict[str, dict[str, Any]] = {
    "linear": {"x": "M", **{f"w.{k}": v for k, v in _PACKED.items()}, "bias": "bias", "out": _FORMS},
    "rms_norm": {"x": "x_scale", "weight": "H", "eps": "eps", "residual": "fused", "out": _FORMS},
    "rotary": {"positions": "pos", "q": "Hq", "k": "Hk", "cos_sin_cache": "scaling", "is_neox": "neox"},
    "silu_and_mul": {"x": "I", "out": _FORMS},
    "write_kv": {"key": "Hk", "value": "D", "kv_cache": "bs", "slot_mapping": "pad", "k_scale": "kscale",
                 "v_scale": "vscale"},
    "rotary_write_kv": {"positions": "pos", "q": "Hq", "k": "Hk", "v": "D", "cos_sin_cache": "scaling",
                        "is_neox": "neox", "kv_cache": "bs", "slot_mapping": "pad", "k_scale": "kscale",
                        "v_scale": "vscale", "q_norm_weight": "qk_norm", "k_norm_weight": "qk_norm",
                        "norm_eps": "eps"},
    "attention": {"q": "Hq", "kv_cache": "Hk", **{f"meta.{k}": v for k, v in _META.items()},
                  "scale": "scale", "out": _FORMS, "k_scale": "kscale", "v_scale": "vscale"},
    "moe": {"x": "T", "router_logits": "E", **{f"w13.{k}": v for k, v in _PACKED.items()},
            **{f"w2.{k}": v for k, v in _PACKED.items()}, "spec.top_k": "top_k", "spec.scoring": "scoring",
            "spec.renormalize": "renorm", "spec.num_expert_group": "groups", "spec.topk_group": "topk_group",
            "spec.correction_bias": "bias", "spec.routed_scaling_factor": "rsf", "out": _FORMS},
    "swap_blocks": {"src": "direction", "dst": "direction", "block_mapping": "n"},
    "copy_blocks": {"kv_caches": "layers", "block_mapping": "n"},
    "sample": {"logits": "V", "out": _FORMS,
               **{f"params.{f}": _sample_field(f) for f in
                  ("temperature", "top_k", "top_p", "min_p", "seeds", "steps")},
               "params.all_greedy": _sample_field("temperature"), "params.all_random": _sample_field("temperature"),
               "params.no_top_k": _sample_field("top_k"), "params.no_top_p": _sample_field("top_p"),
               "params.no_min_p": _sample_field("min_p")},
}
# the per-expert weights are [E, N, K]: their N and K are case parameters of their own
for _w, _n, _k in (("w13", "I", "H"), ("w2", "H", "I")):
    COVERAGE["moe"].update({f"{_w}.weight": "E", f"{_w}.out_features": _n, f"{_w}.in_features": _k})


def op_arguments(op: str) -> list[str]:
    """Every argument of ``op`` as the contract declares it, dataclass arguments by field."""
    import dataclasses
    import inspect

    from halserve.hal import interface

    kinds = {"PackedWeight": interface.PackedWeight, "AttentionMetadata": interface.AttentionMetadata,
             "MoeSpec": interface.MoeSpec, "SamplingTensors": interface.SamplingTensors}
    names = []
    for name, par in inspect.signature(getattr(Backend, op)).parameters.items():
        if name == "self":
            continue
        ann = str(par.annotation)
        cls = next((c for k, c in kinds.items() if k in ann), None)
        if cls is None:
            names.append(name)
        else:
            names += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return names


def coverage_gaps(quick: bool = True) -> list[str]:
    """Op arguments no case varies (empty when the table covers the contract)."""
    gaps = []
    for op in OPS:
        table = [c.params for c in cases(quick=quick, ops=[op])]
        entries = COVERAGE.get(op, {})
        for arg in op_arguments(op):
            how = entries.get(arg)
            if how is None:
                gaps.append(f"{op}.{arg}: no entry in COVERAGE")
            elif isinstance(how, str) and how.startswith("exempt:"):
                continue
            else:
                values = {str(how(p) if callable(how) else p.get(how, "<unset>")) for p in table}
                if len(values) < 2:
                    gaps.append(f"{op}.{arg}: {how if isinstance(how, str) else 'its field'} takes one value "
                                f"({', '.join(values)}) over the {'quick ' if quick else ''}cases")
        for arg in set(entries) - set(op_arguments(op)):
            if isinstance(entries[arg], str) and entries[arg].startswith("exempt:"):
                continue  # harmless, and lets the contract drop a field first
            gaps.append(f"{op}.{arg}: in COVERAGE but not an argument of the op (stale entry)")
    return gaps


def interpreted(backend: Backend) -> bool:
    """True when ``backend`` runs its kernels in the Triton interpreter on the CPU."""
    import os

    from halserve import hal

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    return torch.device(backend.device).type == "cpu" and hal.interpreter_ok(type(backend))


def _how(backend: Backend, case: Case) -> str:
    """How ``backend`` runs ``case``, as its dispatcher decides for the case's real calls
    (the spec ``spec_of`` derives from their arguments): "native", "accelerated[...]",
    "native fallback" or "refused: ...". Runs the case."""
    return run_case(backend, case).how


@contextlib.contextmanager
def native_trace(backend: Backend):
    """Inside: the backend's ``native_ran`` Counter (NativeBackend op bodies run on it, op ->
    calls), cleared first; None for the native backend itself."""
    from halserve.hal.native import NativeBackend

    if type(backend) is NativeBackend or not isinstance(backend, NativeBackend):
        yield None
        return
    backend.native_ran.clear()
    yield backend.native_ran


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
    from halserve.errors import OpRefused
    from halserve.hal.native import NativeBackend

    # The column comes from the dispatcher's own answers for the case's calls (below), never
    # from a spec the harness builds itself: the report and the run cannot disagree.
    how = "native" if type(backend) is NativeBackend else "native fallback"
    res = Result(backend.name, case.op, case.name, "REFUSED", how)
    cache = backend.__dict__.setdefault("_supports_cache", {})  # the HAL dispatcher's answers, per call spec
    cache.clear()
    try:
        with native_trace(backend) as ran:
            outcome = RUNNERS[case.op](backend, case.params, _gen(case, seed), backend.device)
            hidden = int(ran.get(case.op, 0)) if ran is not None else 0
    except OpRefused as e:  # supports() refused one of the case's calls: REFUSED, not FAIL
        msg = str(e)
        res.how = "refused: " + (msg.split("refused: ", 1)[1] if "refused: " in msg else msg)
        return res
    except Exception as e:
        res.status, res.detail = "FAIL", f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return res
    answers = [v for k, v in cache.items() if isinstance(k, tuple) and k and k[0] == case.op] \
        if isinstance(cache, dict) and ran is not None else []
    if answers:  # what the dispatcher really did for this case's calls
        fallbacks = sorted({str(a) for a in answers if a is not True})
        if not fallbacks:
            how = "accelerated (interpreter)" if interpreted(backend) else "accelerated"
        elif all(a is not True for a in answers):
            how = "native fallback"
        else:  # e.g. contiguous q/k run the kernel, the strided form falls back
            how = f"accelerated, some calls {fallbacks[0]}"
            hidden = 0  # native runs are expected here; only all-accelerated cases can be checked
        res.how = how
    if hidden and how.startswith("accelerated"):
        # the report's column must be true: an accelerated case never reaches native
        outcome.errors.append(f"reported accelerated, but NativeBackend.{case.op} ran {hidden} times "
                              f"(a hidden fallback: say 'native fallback: ...' in supports() instead)")
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


def reduced(table: list[Case]) -> list[Case]:
    """The first case of each (op, dtype): what HALSERVE_CONFORMANCE_REDUCED=1 runs for a
    backend whose kernels run in the Triton interpreter (CI time), with --quick."""
    seen, out = set(), []
    for c in table:
        kind = (c.op, c.params.get("dtype"))
        if kind not in seen:
            seen.add(kind)
            out.append(c)
    return out


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
    table = cases(quick=quick, ops=ops)
    if quick and os.environ.get("HALSERVE_CONFORMANCE_REDUCED") == "1" and interpreted(backend):
        table = reduced(table)
    for case in table:
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
    p.add_argument("--engine", action="store_true",
                   help="run the engine tier instead: greedy decode of the demo model and random dense, GQA "
                        "and MoE checkpoints, token-exact vs native in float32, logprob NMSE in bfloat16")


def main(args: argparse.Namespace) -> int:
    from halserve import hal

    ops = [o for spec in (args.op or []) for o in spec.split(",") if o]
    cases(ops=ops)  # validates op names early (ValueError -> one-line error)
    if args.backend:
        targets = [(name, "forced") for name in args.backend]
    elif os.environ.get(hal.ENV_VAR):  # the same switch as serve/generate
        targets = [(os.environ[hal.ENV_VAR], f"forced by {hal.ENV_VAR}")]
    else:
        targets = runnable_backends()
        if not args.json:
            runnable = {n for n, _ in targets}
            for name, _, probe in hal.available():
                if name not in runnable:
                    print(f"{name:<10} not run: {probe.reason}")
    out = sys.stdout
    if args.engine:
        return _main_engine(targets, args, out)
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


def _main_engine(targets, args, out) -> int:
    from halserve.hal.conformance_engine import run_engine

    all_results = []
    for name, how in targets:
        if not args.json:
            print(f"== {name}: engine tier ({how}) ==", file=out, flush=True)
        stream = None if args.json else (lambda r: print(r.line(), file=out, flush=True))
        results = run_engine(name, on_result=stream)
        all_results += results
        if not args.json:
            ok = sum(r.status == "PASS" for r in results)
            print(f"{name}: engine tier {ok}/{len(results)} passed", file=out, flush=True)
    if args.json:
        print(json.dumps([asdict(r) for r in all_results], indent=1))
    return 0 if all(r.status == "PASS" for r in all_results) else 1
