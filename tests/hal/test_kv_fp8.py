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


def _triton_and_native(x: torch.Tensor, ks: float, vs: float, heads: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as keys and -x as values through the Triton kernel (DEV) and native (CPU), into a
    random fp8 cache, every row of x stored, with padding rows (slot -1) of 7.0 shuffled in:
    both caches as bytes."""
    x = x.view(-1, heads, cols)
    t = x.shape[0]
    g = torch.Generator().manual_seed(5)
    npad = 3
    order = torch.randperm(t + npad, generator=g)
    x = torch.cat([x, torch.full((npad, heads, cols), 7.0, dtype=x.dtype)])[order]
    slots = torch.cat([torch.randperm(t + 8, generator=g)[:t], torch.full((npad,), -1)])[order]
    base = torch.randn(2, (t + 8 + 7) // 8, 8, heads, cols, generator=g).to(FP8)
    from halserve.hal.triton.elementwise import write_kv

    got = base.clone().to(DEV)
    write_kv(x.to(DEV), (-x).to(DEV), got, slots.to(DEV), ks, vs)  # the kernel itself, not supports()
    want = _write(NativeBackend(), x, -x, base.clone(), slots, ks, vs)
    return got.cpu().view(torch.uint8), want.view(torch.uint8)


@triton_only
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN inputs in the interpreter
@pytest.mark.parametrize("ks,vs", [(1.0, 1.0), (0.37, 4.0), (0.002, 3.1)])
def test_triton_write_kv_bytes_equal_native(cuda, ks, vs):
    """The kernel's rounding (ties to even, carries into the next binade, subnormals, signed
    zeros, saturation, inf, NaN) stores the very bytes of the torch rule, scales included."""
    nan = torch.tensor([math.nan, math.inf, -math.inf, 0.0])
    x = torch.cat([_hard_values(), nan, -nan.abs(), torch.zeros(56)])  # -abs: a NaN with the sign bit set
    got, want = _triton_and_native(x, ks, vs, 2, 32)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} bytes differ"


def _fp32_sweep() -> torch.Tensor:
    """fp32 values by bit pattern: every 64th pattern over [2^-12, 512] (every binade e4m3
    rounds in, its subnormals, the saturation edge and past it), and every pattern within 2 of
    each midpoint between neighbouring e4m3 values (the ties and their neighbours)."""
    lo, hi = (torch.tensor([2.0 ** -12, 512.0]).view(torch.int32)).tolist()
    sweep = torch.arange(lo, hi + 1, 64, dtype=torch.int32)
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    mids = ((grid[1:] + grid[:-1]) / 2).view(torch.int32)  # exact: one more bit than e4m3's
    near = (mids[:, None] + torch.arange(-2, 3, dtype=torch.int32)).flatten()
    return torch.cat([sweep, near]).view(torch.float32)


def _rne_e4m3_bytes(x: torch.Tensor) -> torch.Tensor:
    """The definition, independent of torch's cast: |x| in float64 (exact for these inputs) to
    the nearest finite e4m3 value, a tie to the even byte (bytes 0..0x7E ascend with the value
    and their last bit is the mantissa's), clamped at 448, NaN 0x7F, the sign bit kept."""
    grid = torch.arange(0x7F, dtype=torch.int32).to(torch.uint8).view(FP8).double()
    xd = x.double()
    a = xd.abs().clamp(max=448.0)
    hi = torch.searchsorted(grid, a).clamp(1, 0x7E)
    d_lo, d_hi = a - grid[hi - 1], grid[hi] - a
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    mag = torch.where(up, hi, hi - 1)
    mag = torch.where(torch.isnan(xd), 0x7F, mag)
    neg = x.view({2: torch.int16, 4: torch.int32}[x.element_size()]) < 0
    return (mag + torch.where(neg, 0x80, 0)).to(torch.uint8)


def _value_classes(dtype: torch.dtype) -> torch.Tensor:
    """fp32: _fp32_sweep with both signs; bf16 and fp16: all 65536 bit patterns."""
    if dtype == torch.float32:
        x = _fp32_sweep()
        return torch.cat([x, -x])
    return torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_rule_is_round_to_nearest_even(dtype):
    """hal/kv_fp8.quantize_kv (torch's cast: native's store and the reference the Triton store
    is held to) is e4m3 round to nearest even by definition over the same value classes, on
    the CPU and on the GPU when there is one."""
    x = _value_classes(dtype)
    want = _rne_e4m3_bytes(x)
    for dev in ["cpu"] + (["cuda"] if ON_GPU else []):
        got = quantize_kv(x.to(dev), 1.0).view(torch.uint8).cpu()
        # a GPU multiply returns its canonical +NaN for -NaN: NaN's sign is the CPU's only
        keep = torch.ones_like(got, dtype=torch.bool) if dev == "cpu" else ~torch.isnan(x.float())
        bad = ((got != want) & keep).nonzero().flatten()
        assert bad.numel() == 0, (dev, f"{bad.numel()} differ, e.g. x={x[bad[:4]].tolist()} "
                                       f"torch={got[bad[:4]].tolist()} rne={want[bad[:4]].tolist()}")


@triton_only
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN inputs in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_e4m3_store_is_exhaustive_against_torch(cuda, dtype):
    """The integer encoder against torch's cast over whole value classes: for fp32 inputs the
    sweep of _fp32_sweep (both signs: keys x, values -x); for bf16 and fp16 inputs every one of
    the 65536 bit patterns (subnormals, inf and NaN included). Scale 1: the stored byte is
    the encoder's answer for exactly these values."""
    x = _fp32_sweep() if dtype == torch.float32 else _value_classes(dtype)  # values -x: the negatives
    # the interpreter's cost is per op, not per element: few programs of 64k elements each; a
    # GPU compiles rows that size slowly, and small ones run fast there
    heads, cols = (2, 512) if ON_GPU else (16, 4096)
    x = torch.cat([x.to(dtype), torch.zeros(-x.numel() % (heads * cols), dtype=dtype)])
    got, want = _triton_and_native(x, 1.0, 1.0, heads, cols)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} of {got.numel()} bytes differ"


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
    # an Ampere card: Triton has no e4m3 conversion there (attention needs it, the store does not)
    old = cuda.capability
    try:
        cuda.capability = (8, 0)
        cuda._supports_cache.clear()
        assert str(cuda.supports("attention", **spec)).startswith("native fallback")
        assert cuda.supports("write_kv", **spec) is True  # the store is integer ops: any GPU
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
    # the start-up line says so: its accelerated list is for a model-dtype cache
    amx = _Bare(CpuAmxBackend)
    amx.tier, amx.threads, amx.batch_invariant, amx.device, amx.amx_gemm = "amx", 1, False, "cpu", True
    assert CpuAmxBackend.describe(amx).count(" fp8-kv-cache=native[write_kv, attention]") == 1
    rvv = _Bare(RvvBackend)
    rvv.build, rvv.device = "scalar", "cpu"
    assert RvvBackend.describe(rvv).count(" fp8-kv-cache=native[write_kv, attention]") == 1
    # native runs an fp8 cache itself: nothing to say
    assert "fp8-kv-cache" not in NativeBackend().describe()
