"""The fp8 (e4m3) KV cache at the op level: native and the Triton kernels (cuda backend, in
TRITON_INTERPRET=1 on a CPU) against float64 references of the storage and read rules, and
the other backends' ``supports`` answers for an fp8 cache."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and importlib.util.find_spec("triton") is not None:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first decorated

from halserve.hal import reference as R  # noqa: E402
from halserve.hal.conformance import paged_attention_case  # noqa: E402
from halserve.hal.kv_fp8 import dequantize_kv, inv_scale, quantize_kv  # noqa: E402
from halserve.hal.native import NativeBackend  # noqa: E402

FP8 = torch.float8_e4m3fn
DEV = "cuda" if ON_GPU else "cpu"
# NMSE of one round-to-nearest store in e4m3 (p = 4 significand bits), as docs/conformance.md
# derives u for bf16: 2^(-2(p-1)) * 0.541 / 12
U_E4M3 = 2.0 ** -6 * 0.541 / 12


def nmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return ((a - b) ** 2).sum().item() / (b ** 2).sum().item()


def _write(backend, key, val, cache, slots, ks, vs):
    backend.write_kv(key, val, cache, slots, k_scale=ks, v_scale=vs)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_kv_stores_x_over_scale_in_e4m3(dtype):
    """Stored bytes: float64 x / scale rounded to e4m3 (power-of-two scales: no rounding in
    the division, so the float32 rule must agree bit for bit), -1 slots untouched."""
    g = torch.Generator().manual_seed(0)
    t, hk, d, bs, nb = 29, 2, 64, 16, 4
    key = (torch.randn(t, hk, d, generator=g) * 3).to(dtype)
    val = (torch.randn(t, hk, d, generator=g) * 300).to(dtype)  # past 448 * 0.5 now and then: saturates
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[[0, 5, t - 1]] = -1
    cache0 = torch.randn(2, nb, bs, hk, d, generator=g).to(FP8)
    got = _write(NativeBackend(), key, val, cache0.clone(), slots, 4.0, 0.5)
    want = R.write_kv((key.double() / 4.0).clamp(-448, 448).to(FP8), (val.double() / 0.5).clamp(-448, 448).to(FP8),
                      cache0, slots)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert (val.float().abs() / 0.5 > 448).any() and (val.float().abs() / 0.5 < 448).any()  # the saturating branch was taken


def test_native_fp8_round_trip_error_is_one_e4m3_store():
    """Dequantized keys sit one e4m3 rounding from the originals: NMSE near u(e4m3)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 2, 64, generator=g)
    cache = torch.zeros(2, 4096 // 16, 16, 2, 64).to(FP8)
    _write(NativeBackend(), x, x, cache, torch.arange(4096), 0.37, 1.0)
    k = dequantize_kv(cache[0].reshape(-1, 2, 64), 0.37)
    err = nmse(k, x)
    # the mantissa of |x| / 0.37 is ~log-uniform: u is the expectation; 1.5u leaves room for
    # the subnormal tail below 2^-6 and the sample's spread
    assert 0.5 * U_E4M3 < err < 1.5 * U_E4M3, (err, U_E4M3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_lens,query_lens", [([45, 1, 130, 70, 19], [1, 1, 1, 23, 19]),
                                                 ([61, 40], [24, 40])])
def test_native_attention_reads_stored_times_scale(dtype, seq_lens, query_lens):
    g = torch.Generator().manual_seed(2)
    q, kv, meta = paged_attention_case(seq_lens, query_lens, 16, 8, 2, 64, dtype, g)
    kv8 = kv.to(FP8)
    ks, vs = 0.5, 3.0
    ref = R.attention(q, torch.stack([kv8[0].double() * ks, kv8[1].double() * vs]), meta, 0.125)
    got = NativeBackend().attention(q, kv8, meta, 0.125, k_scale=ks, v_scale=vs)
    assert got.dtype == dtype
    limit = 1e-9 if dtype == torch.float32 else 1e-4  # conformance's matmul class
    assert nmse(got, ref) < limit
    # the scales are read: swapping them is far outside the limit
    swapped = NativeBackend().attention(q, kv8, meta, 0.125, k_scale=vs, v_scale=ks)
    assert nmse(swapped, ref) > 1e-2


def test_inv_scale_is_the_float32_reciprocal():
    for s in (1.0, 0.37, 3.1, 4.0):
        assert inv_scale(s) == float(torch.tensor(1 / s, dtype=torch.float32))
    x = torch.tensor([1.0, -0.0, 1e-9, 1000.0, -1000.0, float("nan")])
    q = quantize_kv(x, 1.0)
    assert q.dtype == FP8 and q[3].item() == 448 and q[4].item() == -448 and math.isnan(q[5].item())


# ---- the Triton kernels (cuda backend) ------------------------------------------------------------

triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def cuda():
    from halserve.hal.cuda import CudaBackend

    return CudaBackend(DEV)


def _hard_values() -> torch.Tensor:
    """Every e4m3 value, every midpoint between neighbours (ties), values that round into the
    next binade, subnormals, signed zeros, saturation, and a random spread of magnitudes."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    g = torch.Generator().manual_seed(3)
    spread = torch.randn(2000, generator=g) * 10 ** (torch.rand(2000, generator=g) * 7 - 4)
    extra = torch.tensor([0.0, -0.0, 1e-6, -1e-6, 447.9, 448.1, 470.0, -470.0, 1e9, -1e9, 15.5, 15.75, 31.5])
    x = torch.cat([grid, mids, mids.nextafter(torch.tensor(math.inf)), mids.nextafter(torch.tensor(-math.inf)),
                   spread, extra])
    n = x.numel() // 64 * 64
    return x[:n]


@triton_only
@pytest.mark.xfail(ON_GPU, strict=True, reason="on the H200 8-52 of ~10k bytes differ from torch's rule; "
                   "the cuda backend's supports() sends an fp8 write_kv to native on a GPU until fixed")
@pytest.mark.parametrize("ks,vs", [(1.0, 1.0), (0.37, 4.0)])
def test_triton_write_kv_bytes_equal_native(cuda, ks, vs):
    """The kernel's rounding (ties to even, carries into the next binade, subnormals, signed
    zeros, saturation) stores the very bytes of the torch rule. The kernel itself is called
    (on a GPU the backend routes an fp8 write_kv to native)."""
    x = _hard_values().view(-1, 2, 32)
    t = x.shape[0]
    slots = torch.randperm(t + 8)[:t]
    slots[::7] = -1
    base = torch.randn(2, (t + 8 + 7) // 8, 8, 2, 32).to(FP8)
    from halserve.hal.triton.elementwise import write_kv

    got = base.clone().to(DEV)
    write_kv(x.to(DEV), (-x).to(DEV), got, slots.to(DEV), ks, vs)
    want = _write(NativeBackend(), x, -x, base.clone(), slots, ks, vs)
    assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seq_lens,query_lens", [([20, 25, 40], [1, 5, 3]), ([1, 17, 64], [1, 1, 1])])
def test_triton_attention_fp8_against_float64(cuda, dtype, seq_lens, query_lens):
    g = torch.Generator().manual_seed(4)
    q, kv, meta = paged_attention_case(seq_lens, query_lens, 16, 8, 2, 32, dtype, g)
    kv8 = kv.to(FP8)
    ks, vs = 0.5, 2.0
    ref = R.attention(q, torch.stack([kv8[0].double() * ks, kv8[1].double() * vs]), meta, 0.2)
    from halserve.hal.conformance import _meta_to

    got = cuda.attention(q.to(DEV), kv8.to(DEV), _meta_to(meta, DEV), 0.2, k_scale=ks, v_scale=vs)
    limit = 1e-9 if dtype == torch.float32 else 5e-6  # conformance's matmul class
    assert nmse(got, ref) < limit


# ---- which backends take an fp8 cache -----------------------------------------------------------

def test_supports_answers_for_an_fp8_cache(cuda):
    from halserve.hal.rocm.backend import RocmBackend

    spec = dict(dtype=torch.bfloat16, kv_dtype=FP8, head_dim=64, num_kv_heads=2, block_size=16)
    assert NativeBackend().supports("write_kv", **spec) is True
    assert NativeBackend().supports("attention", **spec) is True
    assert "refused" in NativeBackend().supports("attention", **{**spec, "kv_dtype": torch.float8_e5m2})
    assert cuda.supports("write_kv", **spec) is True and cuda.supports("attention", **spec) is True
    # an Ampere card: Triton has no e4m3 conversion there
    old = cuda.capability
    try:
        cuda.capability = (8, 0)
        cuda._supports_cache.clear()
        assert str(cuda.supports("attention", **spec)).startswith("native fallback")
    finally:
        cuda.capability = old
        cuda._supports_cache.clear()
    for op in ("write_kv", "attention"):
        assert str(RocmBackend.supports(_Bare(RocmBackend), op, **spec)).startswith("native fallback")


class _Bare:
    """Just enough of a backend instance for a ``supports`` call on a class that cannot be
    constructed here (no AMD GPU, no RISC-V build)."""

    def __init__(self, cls):
        self.__class__ = type("Bare" + cls.__name__, (cls,), {"__init__": lambda s: None})
        self.capability, self.arch, self.name = (9, 4), "gfx942", cls.name


def test_cpu_backends_send_an_fp8_cache_to_native():
    from halserve.hal.cpu_amx.backend import CpuAmxBackend
    from halserve.hal.riscv_rvv.backend import RvvBackend

    spec = dict(dtype=torch.bfloat16, kv_dtype=FP8, head_dim=64, num_kv_heads=2, block_size=16)
    for cls in (CpuAmxBackend, RvvBackend):
        for op in ("write_kv", "attention"):
            ans = cls.supports(_Bare(cls), op, **spec)
            assert str(ans).startswith("native fallback"), (cls.name, op, ans)
            # and a model-dtype cache still runs their kernels
            assert cls.supports(_Bare(cls), op, **{**spec, "kv_dtype": torch.bfloat16}) is True, (cls.name, op)
