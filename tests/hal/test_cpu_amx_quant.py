"""cpu_amx decode GEMVs on quantized weights (linear_q.c): the int4 x16 layout and the one-row
int8 / W8A8 kernels, on every ISA tier here, against float64 references of the same quantized
math; the layout's round trip; the new kernels against the earlier ones; batch invariance."""
from __future__ import annotations

import pytest
import torch

from halserve.hal.cpu_amx import quant
from halserve.hal.cpu_amx.backend import CpuAmxBackend
from tests.hal.test_cpu_amx import RUNNABLE, backend, nmse, pytestmark  # noqa: F401 (the skip mark)


def ref_linear(x: torch.Tensor, pw, scheme: str, bias) -> torch.Tensor:
    """float64 truth of the scheme's own math (weight-only: x as given; W8A8: x per token
    quantized as the kernel does)."""
    xd = x.double()
    if scheme == "int8_w8a8":
        s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        xd = (torch.round(x.float() / s).clamp(-127, 127) * s).double()
    w = quant.unpack_int4(pw, torch.float64) if pw.scheme == "int4" else pw.weight.double() * pw.scale.double()[:, None]
    y = xd @ w.T
    return y if bias is None else y + bias.double()


def test_interleave_is_a_bitwise_relayout():
    g = torch.Generator().manual_seed(0)
    for n, k, group in ((37, 256, 64), (16, 96, 32), (5, 128, 128), (33, 384, 128)):
        w = torch.randn(n, k, generator=g)
        rm = quant.pack_int4(w, group)
        x16 = quant.interleave_int4(rm)
        nb = -(-n // 16)
        assert x16.weight.shape == (nb, k // 8, 64) and x16.scale.shape == (nb, k // group, 16)
        assert x16.extra == {"group": group, "layout": "x16"}
        assert torch.equal(quant.unpack_int4(x16), quant.unpack_int4(rm))
        # the padding rows are zero weights with zero scales (they add nothing anywhere)
        assert (x16.scale.permute(0, 2, 1).reshape(nb * 16, -1)[n:] == 0).all()


def test_backend_packs_2d_int4_as_x16_and_experts_row_major():
    b = CpuAmxBackend()
    assert b.pack_weight(torch.randn(40, 128), "int4_g32").extra.get("layout") == "x16"
    experts = b.pack_weight(torch.randn(2, 40, 128), "int4_g32")
    assert "layout" not in experts.extra and experts.weight.shape == (2, 40, 64)
    with pytest.raises(ValueError, match="group size 64 must divide in_features 96"):
        b.pack_weight(torch.randn(8, 96), "int4_g64")


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g64", "int4_g128", "int8", "int8_w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_gemv_every_m_against_float64(tier, scheme, dtype):
    """M = 1..16, odd N (a partial 16-row block), bias on and off; int8 also with K not a
    multiple of 64 (the byte-dot tail) or of 4."""
    b = backend(tier)
    g = torch.Generator().manual_seed(3)
    group = int(scheme[6:]) if scheme.startswith("int4") else 0
    # int4: K = 5 groups (not a multiple of 64 for g32); int8: K % 64 and K % 4 tails
    shapes = [(197, 384), (16, 256)] + ([(45, 769), (21, 100)] if scheme.startswith("int8") else [(45, 5 * group)])
    for i, (n, k) in enumerate(shapes):
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
        pw = b.pack_weight(w, scheme)
        every = i == 0 and tier == RUNNABLE[0]  # every M on the best tier; the lower ones spot-check
        for m in range(1, 17) if every else (1, 6, 16):
            bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
            x = torch.randn(m, k, generator=g).to(dtype)
            y = b.linear(x, pw, bias)
            assert y.dtype == dtype and y.shape == (m, n)
            err = nmse(y, ref_linear(x, pw, scheme, bias))
            assert err < (1e-10 if dtype == torch.float32 else 3e-5), (tier, scheme, n, k, m, err)


@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g128"])
def test_int4_bf16_x_within_one_output_rounding(scheme):
    """bf16 x meets exact bf16 weights (products exact in fp32): every output within one bf16
    step of the float64 truth, and nearly all are its own rounding (catches a small bias)."""
    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(8)
    for m, n, k in ((1, 197, 384), (4, 64, 1024), (16, 40, 5632)):
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(m, k, generator=g).bfloat16()
        pw = b.pack_weight(w, scheme)
        ref = ref_linear(x, pw, scheme, None)
        y = b.linear(x, pw).double()
        assert ((y - ref).abs() <= ref.abs() * 2.0 ** -7).all(), (scheme, m, n, k)
        assert (y.bfloat16() != ref.bfloat16()).double().mean() < 0.05


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("scheme", ["int8", "int8_w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_choices_are_bitwise_equal(tier, scheme, dtype):
    """Same exact integer dots, same final float ops: the one-row kernels (M <= 2) and the AMX
    int8 tiles (M = 3..16, AMX builds) give the four-row kernels' bits (hs_qkernels 0), every
    M, bias, K with a byte-dot tail (769) and without (128), N with a partial 16-row block."""
    b = backend(tier)
    default = b.lib.hs_get_qkernels()
    assert default == 2  # AMX tiles at M = 3..16 on, the one-row kernels opt-in
    g = torch.Generator().manual_seed(4)
    try:
        for n, k in ((131, 769), (40, 128)):
            w = (torch.randn(n, k, generator=g) * 0.04).to(dtype)
            bias = torch.randn(n, generator=g).to(dtype)
            pw = b.pack_weight(w, scheme)
            x = torch.randn(16, k, generator=g).to(dtype)
            for m in range(1, 17):
                b.lib.hs_set_qkernels(0)
                old = b.linear(x[:m], pw, bias if m % 2 else None)
                for mode in (1, 2, 3):
                    b.lib.hs_set_qkernels(mode)
                    assert torch.equal(b.linear(x[:m], pw, bias if m % 2 else None), old), (scheme, n, k, m, mode)
    finally:
        b.lib.hs_set_qkernels(default)


def test_x16_int4_agrees_with_the_row_major_kernel(monkeypatch):
    """The same int4 values through both layouts' kernels: equal to fp32 rounding."""
    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(100, 512, generator=g) * 0.05
    x = torch.randn(3, 512, generator=g).bfloat16()
    new = b.pack_weight(w, "int4_g64")
    monkeypatch.setattr(quant, "INT4_INTERLEAVE", False)
    old = b.pack_weight(w, "int4_g64")
    assert "layout" not in old.extra
    assert nmse(b.linear(x, new), b.linear(x, old).double()) < 1e-5


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_bitwise(tier, dtype):
    b = backend(tier, batch_invariant=True)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(75, 256, generator=g).to(dtype)
    x = torch.randn(40, 256, generator=g).to(dtype)
    for scheme in ("int4_g32", "int4_g128", "int8", "int8_w8a8"):
        pw = b.pack_weight(w, scheme)
        full = b.linear(x, pw)
        for m in (1, 2, 3, 5, 16, 17):
            assert torch.equal(b.linear(x[:m], pw), full[:m]), (tier, scheme, m)
            assert torch.equal(b.linear(x[m:m + 1], pw), full[m:m + 1]), (tier, scheme, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_rows_of_x16_are_bitwise_torchs(dtype):
    """The large-M path's C dequantizer reads the x16 layout: (q.float() * scale).to(dtype)."""
    b = CpuAmxBackend()
    w = b.pack_weight(torch.randn(75, 1536, generator=torch.Generator().manual_seed(9)), "int4_g64")
    _, kind, wp, sp, group, _, _ = b._plan(w)
    assert kind == 5
    ref = quant.dequant_any(w, dtype)
    got = torch.full_like(ref, float("nan"))
    for n0, n1 in ((0, 7), (7, 50), (50, 75)):
        b.lib.hs_dequant_rows(wp, kind, sp, group, 1536, n0, n1, got[n0:].data_ptr(), int(dtype == torch.bfloat16))
    assert torch.equal(got, ref)
    x = torch.randn(40, 1536, dtype=dtype)  # M > SMALL_M_QUANT: the tiled GEMM on those rows
    assert nmse(b.linear(x, w), x.double() @ quant.unpack_int4(w, torch.float64).T) < 3e-5


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("scheme", ["int8", "int8_w8a8", "int4_g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_claimed_split_writes_every_row_once_with_the_static_bits(tier, scheme, dtype):
    """The batch-1 GEMVs hand out chunks of rows by atomic claims (a thread done with its own
    run takes the others' next chunks): at 1, 2 and 3 threads, N from a single partial chunk
    to many uneven ones, every output is written (y starts as NaN) and equals the static
    split's bits (hs_qkernels bit 2) and the float64 truth."""
    b = backend(tier)
    default, threads = b.lib.hs_get_qkernels(), b.lib.hs_get_threads()
    g = torch.Generator().manual_seed(10)
    k = 320 if scheme.startswith("int4") else 200  # int8: a K tail past the 64-byte dots
    try:
        for n in (5, 16, 197, 1031):
            w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
            pw = b.pack_weight(w, scheme)
            for m in (1, 2):
                x = torch.randn(m, k, generator=g).to(dtype)
                got = {}
                for nt in (1, 2, 3):
                    b.lib.hs_set_threads(nt)
                    for static in (0, 4):
                        b.lib.hs_set_qkernels((default | 1) & ~4 | static)
                        call = b.linear_call(x, pw)
                        call.y.fill_(float("nan"))
                        call()
                        assert not call.y.isnan().any(), (scheme, n, m, nt, static)
                        got[nt, static] = call.y.clone()
                first = got[1, 4]
                for key, y in got.items():
                    assert torch.equal(y, first), (scheme, n, m, key)
                assert nmse(first, ref_linear(x, pw, scheme, None)) < (1e-10 if dtype == torch.float32 else 3e-5)
    finally:
        b.lib.hs_set_qkernels(default)
        b.lib.hs_set_threads(threads)


def _thp_eligible(addr: int) -> "bool | None":
    """THPeligible of the mapping holding ``addr`` (None where /proc does not say)."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for ln in lines:
        head = ln.split()[0] if ln else ""
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and ln.startswith("THPeligible:"):
            return ln.split()[1] == "1"
    return None


def test_quantized_weights_sit_on_huge_pages_with_their_values():
    """pack_weight puts int8 / W8A8 / int4 (x16 and stacked experts) weights 2 MiB-aligned in
    a mapping advised MADV_HUGEPAGE (the kernel says THPeligible where THP is not 'never'),
    bit for bit the values of the plain allocation; small weights stay as they were."""
    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(11)
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        mode = ""
    w2, w3 = torch.randn(2200, 2048, generator=g), torch.randn(2, 2200, 1024, generator=g)  # int4: 2.2 MB
    for scheme, w in (("int8", w2), ("int8_w8a8", w2), ("int4_g64", w2), ("int4_g64", w3), ("int8", w3)):
        quant.HUGE_PAGES = False
        try:
            plain = b.pack_weight(w, scheme)
        finally:
            quant.HUGE_PAGES = True
        huge = b.pack_weight(w, scheme)
        assert torch.equal(huge.weight, plain.weight) and huge.weight.dtype == plain.weight.dtype, scheme
        assert huge.weight.is_contiguous() and huge.weight.data_ptr() % quant.HUGE_PAGE == 0, scheme
        if "[never]" not in mode and mode:
            assert _thp_eligible(huge.weight.data_ptr()) is not False, scheme
        x = torch.randn(1, w.shape[-1], generator=g).bfloat16()
        if w.dim() == 2:
            assert torch.equal(b.linear(x, huge), b.linear(x, plain)), scheme
    small = torch.randn(64, 256, generator=g).to(torch.int8)  # under one huge page: left as it is
    assert quant.on_huge_pages(small) is small


def test_huge_pages_fall_back_to_torch_memory_when_no_mapping_is_had(monkeypatch):
    """mmap failing (an address-space limit, ENOMEM) leaves the weight in torch's memory,
    same values, the linear running: never an error at load."""
    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(12)
    w = torch.randn(1100, 2048, generator=g)

    tried = []

    def no_map(*a, **kw):
        tried.append(a)
        raise OSError(12, "Cannot allocate memory")

    plain = {s: b.pack_weight(w, s) for s in ("int8", "int4_g64")}  # on huge pages where offered
    monkeypatch.setattr(quant.mmap, "mmap", no_map)
    x = torch.randn(1, 2048, generator=g).bfloat16()
    for scheme, ref in plain.items():
        pw = b.pack_weight(w, scheme)
        assert torch.equal(pw.weight, ref.weight), scheme
        assert torch.equal(b.linear(x, pw), b.linear(x, ref)), scheme
    assert tried  # the failing mmap was reached (not a weight left in torch's memory before it)


def test_int4_with_float16_activations_is_refused_by_name():
    """float16 activations fall back to native for the C kernels' other schemes, but native
    cannot read cpu_amx's int4 layout (it raised torch's own 't() expects ...'): linear and
    moe refuse by name; int8 weights still run through native."""
    from halserve.errors import OpRefused
    from halserve.hal.interface import MoeSpec

    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 128, generator=g).half()
    with pytest.raises(OpRefused, match="int4 weights take float32 or bfloat16 activations, not torch.float16"):
        b.linear(x, b.pack_weight(torch.randn(64, 128, generator=g), "int4_g32"))
    w = torch.randn(64, 128, generator=g)
    assert nmse(b.linear(x, b.pack_weight(w, "int8")), x.double() @ w.double().T) < 1e-4
    w13 = b.pack_weight(torch.randn(4, 64, 128, generator=g) * 0.1, "int4")
    w2 = b.pack_weight(torch.randn(4, 128, 32, generator=g) * 0.1, "int4")
    with pytest.raises(OpRefused, match="int4 weights take float32 or bfloat16"):
        b.moe(x, torch.randn(3, 4, generator=g), w13, w2, MoeSpec(top_k=2))


def test_linears_of_two_dtypes_on_two_threads_keep_their_own_output_dtype():
    """hs_linear's kernels took y's dtype from one process-wide variable: a float32 call on
    another Python thread (cffi lets go of the GIL) could make a bfloat16 call write float32
    values, twice its output's bytes. Each thread's outputs stay its own bits and nothing is
    written past a bfloat16 output (a guard behind it)."""
    import threading

    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(13)
    n, k = 512, 256
    pw = b.pack_weight(torch.randn(n, k, generator=g).bfloat16())
    xs = {torch.bfloat16: torch.randn(1, k, generator=g).bfloat16(), torch.float32: torch.randn(1, k, generator=g)}
    want = {dt: b.linear(x, pw) for dt, x in xs.items()}
    bad: list = []

    def run(dt):
        buf = torch.full((2 * n,), 7.0, dtype=dt)
        out = buf[:n].view(1, n)
        for _ in range(400):
            y = b.linear(xs[dt], pw, out=out)
            if not (torch.equal(y, want[dt]) and (buf[n:] == 7.0).all()):
                bad.append(dt)
                return

    threads = [threading.Thread(target=run, args=(dt,)) for dt in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, bad
