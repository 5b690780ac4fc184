"""cpu_amx's AMX tile GEMM (gemm_amx.c) for bf16 weights and 2..AMX_MAX_M rows (batched
decode): float64 references over odd M, N and K (every tile edge), bias, bf16 and fp32
activations; which calls reach it; a bf16 model's 16 sequences through it as accurate as
through the pre-AMX paths against HF's float32 truth."""
from __future__ import annotations

import pytest
import torch

from halserve.hal.cpu_amx import backend as amx_backend
from halserve.hal.cpu_amx.backend import CpuAmxBackend
from halserve.models.loader import load_model
from tests.hal.test_cpu_amx import RUNNABLE, _meta, backend, nmse
from tests.models.test_models import BLOCK_SIZE, metadata

pytestmark = pytest.mark.skipif("amx" not in RUNNABLE, reason="the AMX tile kernel needs amx_tile and amx_bf16")


class _Count:
    """The backend's C library with its hs_gemm_amx calls counted."""

    def __init__(self, lib):
        self._lib, self.calls = lib, 0

    def __getattr__(self, name):
        f = getattr(self._lib, name)
        if name != "hs_gemm_amx":
            return f

        def counted(*a):
            self.calls += 1
            return f(*a)

        return counted


def _amx() -> CpuAmxBackend:
    b = backend("amx")
    assert b.amx_gemm
    b.lib = _Count(b.lib)
    return b


@pytest.fixture(params=[32, 16, 0], ids=["rows32", "rows16", "auto"])
def block_rows(request):
    """Every W block height the kernel offers (hs_set_amx_rows: 32 with 2 x tiles a W tile and
    passes again over the block for more x, 16 with up to 4 x tiles a W tile, 0 the default:
    32 rows up to 32 x rows on <= 4 threads, else 16), the default put back after."""
    lib = backend("amx").lib
    lib.hs_set_amx_rows(request.param)
    yield request.param
    lib.hs_set_amx_rows(0)


@pytest.mark.parametrize("k,n", [(64, 32), (2048, 48), (100, 50), (31, 17), (77, 7), (96, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_amx_gemm_against_float64(k, n, dtype, block_rows, monkeypatch):
    """Every M class of the tile schedule (one x tile, a pair, several pairs, ragged), N and K
    ragged against the 32 x 32 tiles; bf16 outputs within one bf16 step of the truth and
    nearly all equal to its own rounding, fp32 activations (hi + lo split) to ~fp32."""
    monkeypatch.setattr(amx_backend, "AMX_MIN_M", 1)  # the kernel's own range, whatever the dispatch
    b = _amx()
    g = torch.Generator().manual_seed(k * 1000 + n)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).bfloat16()
    pw = b.pack_weight(w)
    for m in (1, 2, 3, 15, 16, 17, 32, 33, 64, 100, 128):
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = None if m % 2 else torch.randn(n, generator=g).to(dtype)
        before = b.lib.calls
        y = b.linear(x, pw, bias)
        assert b.lib.calls == before + 1, "the AMX kernel did not run"
        ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
        assert y.dtype == dtype and y.shape == (m, n)
        if dtype == torch.float32:
            assert nmse(y, ref) < 1e-10, (m, k, n, nmse(y, ref))
            continue
        step = ref.abs().clamp(min=1e-30) * 2.0 ** -7 + 1e-6 * k ** 0.5
        assert ((y.double() - ref).abs() <= step).all(), (m, k, n, float(((y.double() - ref).abs() / step).max()))
        off = (y != ref.bfloat16()).double().mean()
        assert off < 0.05, (m, k, n, float(off))


def test_amx_gemm_block_schedule_does_not_change_bits():
    """W blocks handed out one at a time to whichever thread is free (hs_set_amx_sched(1), the
    default) or split evenly (0): a block's sums never depend on the thread that ran it, so
    the output is the same bits, with as many threads as the pool has and with one."""
    b = _amx()
    g = torch.Generator().manual_seed(8)
    w = (torch.randn(7 * 32 + 5, 160, generator=g) * 0.1).bfloat16()  # 8 blocks, a ragged one
    pw = b.pack_weight(w)
    threads = b.threads
    try:
        for t in sorted({1, max(2, threads)}):
            b.lib.hs_set_threads(t)
            for m, dtype in ((32, torch.bfloat16), (45, torch.float32)):
                x = torch.randn(m, 160, generator=g).to(dtype)
                b.lib.hs_set_amx_sched(0)
                even = b.linear(x, pw, None)
                b.lib.hs_set_amx_sched(1)
                assert torch.equal(b.linear(x, pw, None), even), (t, m)
                assert nmse(even, x.double() @ w.double().T) < 3e-5
    finally:
        b.lib.hs_set_amx_sched(1)
        b.lib.hs_set_threads(threads)


def test_amx_gemm_writes_into_out_and_reads_strided_x():
    b = _amx()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=g).bfloat16()
    pw = b.pack_weight(w)
    x = torch.randn(24, 192, generator=g).bfloat16()[:, ::2]  # not contiguous
    out = torch.empty(24, 40, dtype=torch.bfloat16)
    y = b.linear(x, pw, out=out)
    assert y is out and b.lib.calls == 1
    ref = x.double() @ w.double().T
    assert nmse(out, ref) < 3e-5


def test_which_calls_reach_the_amx_kernel():
    """bf16 weights with AMX_MIN_M..AMX_MAX_M rows only (from one row: batch-1 decode too), over
    AMX_MAX_M rows on oneDNN, fp32 and int8 weights on their kernels, batch-invariant mode on the C kernels
    (bitwise row-independent), and amx_gemm=False turns it off."""
    b = _amx()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g)
    bfw, f32w, i8w = b.pack_weight(w.bfloat16()), b.pack_weight(w), b.pack_weight(w.bfloat16(), "int8")
    lo, top = amx_backend.AMX_MIN_M, amx_backend.AMX_MAX_M
    mid = max(lo, 8)

    def calls(pw, m, dtype=torch.bfloat16):
        before = b.lib.calls
        b.linear(torch.randn(m, 64, generator=g).to(dtype), pw)
        return b.lib.calls - before

    assert lo == 1 and [calls(bfw, m) for m in (1, 2, top, top + 1)] == [1, 1, 1, 0]
    assert calls(bfw, mid, torch.float32) == 1
    assert calls(f32w, mid) == 0 and calls(i8w, mid) == 0
    b.amx_gemm = False
    assert calls(bfw, mid) == 0
    bi = backend("amx", batch_invariant=True)
    assert bi.amx_gemm
    bi.lib = _Count(bi.lib)
    x = torch.randn(20, 64, generator=g).bfloat16()
    full = bi.linear(x, bfw)
    assert torch.equal(bi.linear(x[:3], bfw), full[:3]) and bi.lib.calls == 0


def test_bf16_model_batch_through_amx_is_as_accurate_as_before(checkpoint):
    """16 sequences of 6 tokens in one forward (96 rows: every linear on the AMX kernel) of a
    bf16 model: logits as close to HF's float32 truth as the pre-AMX paths' (C GEMV /
    oneDNN), and the same greedy tokens as the truth wherever its top two are apart."""
    from transformers import AutoModelForCausalLM

    path = checkpoint("llama")
    b = _amx()
    model, cfg = load_model(path, b, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    seqs, plen = 16, 6
    ids = torch.randint(5, 512, (seqs, plen), generator=g)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        truth = hf(ids).logits.float().reshape(seqs * plen, -1)
    meta = metadata([([i], plen, plen) for i in range(seqs)], cfg.sliding_window)
    shape = b.kv_cache_shape(seqs, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)

    def logits(on: bool) -> torch.Tensor:
        b.amx_gemm = on
        caches = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(cfg.num_layers)]
        with torch.inference_mode():
            h = model.forward(ids.flatten(), torch.arange(plen).repeat(seqs), caches, meta)
            return model.compute_logits(h).float()

    before = b.lib.calls
    on = logits(True)
    assert b.lib.calls > before
    off = logits(False)
    e_on, e_off = nmse(on, truth), nmse(off, truth)
    assert e_on < 1e-3 and e_on < 1.5 * e_off + 1e-6, (e_on, e_off)
    top2 = truth.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * truth.abs().amax(-1)
    assert clear.sum() > seqs * plen // 4
    assert torch.equal(on.argmax(-1)[clear], truth.argmax(-1)[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_sequence_decode_attention(dtype):
    """40 decode rows of 1..600 keys (one to five spans each) in one call: against native's
    attention, bit-equal whether the key bound is the longest row or a captured step's
    max_model_len (only the rows' own spans are work items), and each row alone as in the batch."""
    from halserve.hal.native import NativeBackend
    from tests.hal.test_cpu_amx import _meta

    b, nat = backend("amx"), NativeBackend()
    g = torch.Generator().manual_seed(11)
    hq, hk, d = 8, 2, 64
    ctx = torch.randint(1, 600, (40,), generator=g).tolist()
    ctx[:3] = [1, 128, 129]  # span edges
    meta, nblk = _meta(ctx, [1] * len(ctx))
    cache = torch.randn(2, nblk, BLOCK_SIZE, hk, d, generator=g).to(dtype)
    q = torch.randn(len(ctx), hq, d, generator=g).to(dtype)
    out = b.attention(q, cache, meta, 0.125)
    ref = nat.attention(q.float(), cache.float(), meta, 0.125)
    assert nmse(out, ref) < (1e-10 if dtype == torch.float32 else 3e-5), nmse(out, ref)
    meta.seq_lens_host = [4096] * len(ctx)  # the bound a captured step passes (max_model_len)
    assert torch.equal(b.attention(q, cache, meta, 0.125), out)
    for i in (0, 2, 17):
        one, _ = _meta([ctx[i]], [1])
        one.block_tables = meta.block_tables[i:i + 1]
        assert torch.equal(b.attention(q[i:i + 1], cache, one, 0.125), out[i:i + 1]), i


def _attention_f64(q, cache, meta, scale):
    """Decode/prefill attention in float64 from the paged cache: the truth."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    hq, hk = q.shape[1], cache.shape[3]
    cu, lens, tables = meta.cu_seqlens_q.tolist(), meta.seq_lens.tolist(), meta.block_tables
    for i, ctx in enumerate(lens):
        pos = torch.arange(ctx)
        slots = tables[i][pos // BLOCK_SIZE].long()
        k = cache[0][slots, pos % BLOCK_SIZE].double()  # [ctx, hk, d]
        v = cache[1][slots, pos % BLOCK_SIZE].double()
        for t in range(cu[i], cu[i + 1]):
            p = ctx - (cu[i + 1] - t)  # this query's position: keys 0..p
            kk = k[:p + 1].repeat_interleave(hq // hk, 1)
            vv = v[:p + 1].repeat_interleave(hq // hk, 1)
            w = torch.softmax(torch.einsum("hd,khd->hk", q[t].double(), kk) * scale, -1)
            out[t] = torch.einsum("hk,khd->hd", w, vv)
    return out


@pytest.mark.parametrize("hq,hk,d", [(32, 4, 64), (4, 4, 32), (16, 1, 128), (6, 2, 96)])
def test_amx_attention_against_float64(hq, hk, d):
    """bf16 q and cache take the AMX tile span (hs_set_attn_amx; attention.c's span_amx):
    groups of 1..16 heads, head sizes 32..128, decode rows of 1..520 keys (partial 16-key
    tiles, 32-key P V steps and the 256-key spans at every edge) and two short prefill rows, with
    the unused rows of every cache block NaN. Within the bf16 output's own rounding of the
    float64 truth (P is split hi + lo, so not rounded to bf16), as close as the AVX-512 span,
    and not its bits (the switch reaches the tiles)."""
    b = backend("amx")
    g = torch.Generator().manual_seed(5)
    ctx = ([1, 2, 15, 16, 17, 31, 32, 33, 127, 128, 129, 255, 256, 257, 300, 511, 512, 513, 520]
           + torch.randint(1, 520, (9,), generator=g).tolist())
    ql = [1] * len(ctx)
    ctx += [40, 7]  # prefill rows: 5 and 7 query tokens
    ql += [5, 7]
    meta, nblk = _meta(ctx, ql)
    cache = torch.randn(2, nblk, BLOCK_SIZE, hk, d, generator=g).to(torch.bfloat16)
    used = torch.zeros(nblk, BLOCK_SIZE, dtype=torch.bool)
    for i, c in enumerate(ctx):
        pos = torch.arange(c)
        used[meta.block_tables[i][pos // BLOCK_SIZE].long(), pos % BLOCK_SIZE] = True
    cache[:, ~used] = float("nan")  # what a block's rows past its sequence may hold
    q = torch.randn(sum(ql), hq, d, generator=g).to(torch.bfloat16)
    scale = d ** -0.5
    truth = _attention_f64(q, cache, meta, scale)
    floor = nmse(truth.to(torch.bfloat16), truth)  # the output's own rounding
    try:
        b.lib.hs_set_attn_amx(0)
        avx = b.attention(q, cache, meta, scale)
    finally:
        b.lib.hs_set_attn_amx(1)
    out = b.attention(q, cache, meta, scale)
    assert torch.isfinite(out.float()).all()
    assert nmse(out, truth) < 1.05 * floor, (nmse(out, truth), floor)
    assert nmse(avx, truth) < 1.05 * floor
    assert not torch.equal(out, avx)
    # each decode row alone gives its bits in the batch
    for i in (0, 10, 14):
        one, _ = _meta([ctx[i]], [1])
        one.block_tables = meta.block_tables[i:i + 1]
        assert torch.equal(b.attention(q[i:i + 1], cache, one, scale), out[i:i + 1]), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 40])
def test_prefill_rows_through_decode_spans_have_decode_bits(dtype, window):
    """Batch-invariant mode (hs_set_attn_prefill_spans(1)): a token computed inside a prefill
    chunk gives the bits it gets as a decode row (both through the same SPAN-key spans and merge), at positions in one
    span and past one or two; with the switch off (the default, one pass per prefill row) the
    bits past one span differ, so the check can fail. (The switch makes
    tests/engine/test_bi_chunking.py's cpu_amx case pass: its strict xfail goes with it.)
    The backend passes its batch_invariant flag with every call (hs_attention's prefill_spans),
    so the process-wide switch, stale here on purpose, is not read: a value cached once per
    process left a second tier's library off, and two backends on two threads raced on it."""
    g = torch.Generator().manual_seed(21)
    hq, hk, d, chunk = 8, 2, 64, 6
    ctx = [50, 300, 140, 129, 530, 600]  # each sequence's last chunk of 6 query tokens ends at its context
    meta, nblk = _meta(ctx, [chunk] * len(ctx), window=window)
    cache = torch.randn(2, nblk, BLOCK_SIZE, hk, d, generator=g).to(dtype)
    q = torch.randn(chunk * len(ctx), hq, d, generator=g).to(dtype)
    for on in (1, 0):  # every tier in a row with one flag: each library's switch must be set
        for tier in RUNNABLE:
            b = backend(tier, batch_invariant=bool(on))
            b.lib.hs_set_attn_prefill_spans(1 - on)  # stale: as an A/B run or an old build left it
            pre = b.attention(q, cache, meta, 0.125)
            same = []
            for i, c in enumerate(ctx):
                for j in (0, chunk - 1):  # the chunk's first and last tokens as decode rows
                    one, _ = _meta([c - (chunk - 1 - j)], [1], window=window)
                    one.block_tables = meta.block_tables[i:i + 1]
                    row = i * chunk + j
                    same.append(torch.equal(b.attention(q[row:row + 1], cache, one, 0.125), pre[row:row + 1]))
            if on:
                assert all(same), (tier, same)
            elif tier == "amx":  # (other tiers' bf16 rows can round alike either way)
                assert not all(same), tier  # past a span's 256 keys one pass rounds otherwise


def test_amx_gemm_fp32_inf_activations_match_torch(monkeypatch):
    """fp32 x is split into bf16 hi + lo: an inf x must not become NaN (lo = inf - inf), and a
    finite x that rounds up to bf16 inf must stay finite; NaN stays NaN. Against torch's
    float32 matmul of the same values, position by position (inf, -inf, NaN, finite)."""
    monkeypatch.setattr(amx_backend, "AMX_MIN_M", 2)
    b = _amx()
    g = torch.Generator().manual_seed(11)
    w = (torch.rand(40, 64, generator=g) + 0.5).bfloat16()  # all positive: inf rows stay inf
    x = torch.randn(5, 64, generator=g)
    x[0, 3] = float("inf")
    x[1, 7] = float("-inf")
    x[2, 5] = float("nan")
    w[:, 9] = 0.25  # a finite product with the next line's x
    x[3, 9] = torch.finfo(torch.float32).max  # rounds up to bf16 inf
    y = b.linear(x, b.pack_weight(w), None)
    assert b.lib.calls == 1
    ref = x @ w.float().T
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref)) and torch.isposinf(y[0]).all()
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref)) and torch.isneginf(y[1]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y[2]).all()
    assert nmse(y[3:], x[3:].double() @ w.double().T) < 1e-10
