"""cpu_amx: every ISA tier the CPU here can run (AMX / AVX-512 / AVX2), against float64
references of the same quantized math; batch invariance bit for bit; token-exact greedy
decode against HF transformers (float32); quantization names refused by name elsewhere."""
from __future__ import annotations

import platform

import pytest
import torch

from halserve.hal import conformance as C
from halserve.hal.cpu_amx import lib as cpu_lib
from halserve.hal.cpu_amx import quant, tiers
from halserve.hal.cpu_amx.backend import CpuAmxBackend
from halserve.hal.native import NativeBackend
from halserve.models.loader import ModelLoadError, load_model
from tests.models.test_models import DECODE_STEPS, PROMPT_LEN, hf_logits, prompt, run_greedy

X86 = platform.machine() in ("x86_64", "AMD64")
FLAGS = tiers.cpu_flags()
RUNNABLE = [t for t in cpu_lib.TIERS if X86 and all(f in FLAGS for f in cpu_lib.NEEDS[t])]
pytestmark = pytest.mark.skipif(not RUNNABLE, reason="cpu_amx needs an x86-64 CPU with AVX2 and FMA")


def backend(tier: str, batch_invariant: bool = False) -> CpuAmxBackend:
    """A backend running ``tier``'s build (the probe itself picks only the best tier)."""
    b = CpuAmxBackend(batch_invariant=batch_invariant)
    b.ffi, b.lib = cpu_lib.load(tier)
    if tier == "amx" and b.lib.hs_amx_request() != 0:
        pytest.skip("the kernel refused AMX tile state here")
    b.lib.hs_set_threads(b.threads)
    b.tier = tier
    return b


def nmse(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float(((a - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=1e-300))


def test_probe_names_the_tier_it_chose():
    p = CpuAmxBackend.probe()
    assert p.score == tiers.SCORES[RUNNABLE[0]] and p.reason.startswith(f"{RUNNABLE[0]} tier")
    assert p.score > NativeBackend.probe().score


def test_forced_tier(monkeypatch):
    monkeypatch.setenv(tiers.ENV, "avx2")
    chosen = tiers._choose()
    assert chosen.name == "avx2" and chosen.lib.hs_tier() == 1 and "HALSERVE_CPU_TIER=avx2" in chosen.reason
    monkeypatch.setenv(tiers.ENV, "sse9")
    bad = tiers._choose()
    assert bad.name is None and "'sse9'" in bad.reason and "avx2" in bad.reason


def _ref_linear(x: torch.Tensor, pw, scheme: str) -> torch.Tensor:
    """float64 reference of the scheme's own arithmetic (the quantization is the scheme's;
    only the kernel's rounding may differ)."""
    xd = x.double()
    if scheme == "int8_w8a8":
        s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        xd = (torch.round(x.float() / s).clamp(-127, 127) * s).double()
    if pw.scheme == "int4":
        w = quant.unpack_int4(pw, torch.float64)
    elif pw.scheme == "int8":
        w = pw.weight.double() * pw.scale.double()[:, None]
    else:
        w = pw.weight.double()
    return xd @ w.T


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("scheme", ["none", "int8", "int8_w8a8", "int4", "int4_g32", "int4_g64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_schemes(tier, scheme, dtype):
    b = backend(tier)
    g = torch.Generator().manual_seed(0)
    k, n = 384, 197  # K a multiple of 128 (int4 groups), N odd: the 4-row blocks' tail
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    pw = b.pack_weight(w, scheme)
    for m in (1, 5, 70):  # 70 > the C kernel's M for float weights: oneDNN runs it
        x = torch.randn(m, k, generator=g).to(dtype)
        y = b.linear(x, pw, bias)
        ref = _ref_linear(x, pw, scheme) + bias.double()
        limit = 1e-10 if dtype == torch.float32 else 3e-5
        assert y.dtype == dtype and y.shape == (m, n)
        assert nmse(y, ref) < limit, (tier, scheme, m, nmse(y, ref))


@pytest.mark.parametrize("scheme", ["int8", "int4", "int8_w8a8"])
def test_bf16_activation_kernels_are_within_one_output_rounding(scheme):
    """The byte-dot (VPDPBUSD) and bf16-dot (VDPBF16PS) kernels for bf16 activations: every
    output is the float64 truth of the same quantized math within one bf16 step, plus for
    int8 weight-only the proven bound of its 16-bit activation grid (each x moves at most
    half a step of amax / 32767). A looser NMSE bound would let a 0.4% error through."""
    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(7)
    for m, n, k in ((1, 197, 384), (3, 64, 1024), (2, 40, 5632)):
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(m, k, generator=g).bfloat16()
        pw = b.pack_weight(w, scheme)
        ref = _ref_linear(x, pw, scheme)
        y = b.linear(x, pw).double()
        step = ref.abs().clamp(min=1e-30) * 2.0 ** -7  # one bf16 ulp, upper bound
        if scheme == "int8":
            wd = pw.weight.double() * pw.scale.double()[:, None]
            step = step + 0.5 * (x.double().abs().amax(-1, keepdim=True) / 32767) * wd.abs().sum(-1)[None, :]
        assert ((y - ref).abs() <= step).all(), (scheme, m, n, k, float(((y - ref).abs() / step).max()))
        # and nearly every output is the truth's own bf16 rounding: a systematic 0.2% error
        # (inside one step) would change the rounding of a third of them
        off = (y.bfloat16() != ref.bfloat16()).double().mean()
        assert off < 0.05, (scheme, m, n, k, float(off))


def test_int4_pack_error_is_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    for group in (32, 64, 128):
        pw = quant.pack_int4(w, group)
        assert pw.weight.shape == (64, 128) and pw.weight.dtype == torch.uint8 and pw.scale.shape == (64, 256 // group)
        err = (quant.unpack_int4(pw) - w).abs().reshape(64, -1, group)
        assert (err <= pw.scale[..., None] / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="group size 128 must divide in_features 96"):
        quant.pack_int4(torch.randn(4, 96), 128)


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_batch_invariant_bitwise(tier, dtype):
    b = backend(tier, batch_invariant=True)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(131, 256, generator=g).to(dtype)
    x = torch.randn(40, 256, generator=g).to(dtype)
    for scheme in ("none", "int8", "int8_w8a8", "int4", "int4_g64"):
        pw = b.pack_weight(w, scheme)
        full = b.linear(x, pw)
        for m in (1, 3, 17):
            assert torch.equal(b.linear(x[:m], pw), full[:m]), (scheme, m)


def test_linear_plan_follows_the_weight_and_the_bare_call_matches():
    """The per-weight plan (kernel, pointers) is made once, remade when ``w.weight`` is
    replaced, and the perf tool's bare C call computes what ``linear`` computes."""
    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 256, generator=g).bfloat16()
    for scheme in ("none", "int8", "int8_w8a8", "int4"):
        pw = b.pack_weight(torch.randn(40, 256, generator=g).bfloat16(), scheme)
        y = b.linear(x, pw)
        call = b.linear_call(x, pw)
        call()
        assert torch.equal(call.y, y), scheme
    pw = b.pack_weight(torch.randn(40, 256, generator=g).bfloat16())
    first = b.linear(x, pw)
    pw.weight = -pw.weight  # a new tensor: the old plan's pointer must not be used
    assert torch.equal(b.linear(x, pw), -first)


def test_few_row_ops_on_one_thread_compute_the_same_bits():
    """hs_set_small_parallel(0) runs a decode step's silu_and_mul and attention on the
    calling thread: the same arithmetic, so the same bits."""
    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(9)
    q, kv, meta = C.paged_attention_case([300, 37], [1, 1], 16, 8, 2, 64, torch.bfloat16, g)
    gu = torch.randn(2, 2 * 5632, generator=g).bfloat16()
    outs = []
    try:
        for on in (1, 0):
            b.lib.hs_set_small_parallel(on)
            outs.append((b.attention(q, kv, meta, 0.125), b.silu_and_mul(gu)))
    finally:
        b.lib.hs_set_small_parallel(1)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert nmse(outs[1][0], _sdpa_ref(q, kv, meta)) < 1e-4


def _sdpa_ref(q, kv, meta):
    from halserve.hal import reference

    return reference.attention(q, kv, meta, 0.125)


def _meta(ctx_lens, q_lens, bs=16, window=None):
    from tests.models.test_models import metadata

    tables, nxt, seqs = [], 0, []
    for ctx, q in zip(ctx_lens, q_lens):
        nb = (ctx + bs - 1) // bs
        table = list(range(nxt, nxt + nb))[::-1]  # scattered, backwards
        nxt += nb
        seqs.append((table, ctx, q))
    meta = metadata(seqs, window)
    meta.num_decode_seqs = 0
    return meta, nxt


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_decode_split_and_batch_invariance(tier, dtype):
    """Decode rows over 300-700 keys (several spans merged), a prefill row beside them, a
    sliding window; each decode row's output bit-equal alone and in the batch."""
    b, nat = backend(tier, batch_invariant=True), NativeBackend()
    g = torch.Generator().manual_seed(3)
    hq, hk, d = 8, 2, 64
    for window in (None, 200):
        ctx, ql = [700, 300, 45], [1, 1, 45]
        meta, nblk = _meta(ctx, ql, window=window)
        cache = torch.randn(2, nblk, 16, hk, d, generator=g).to(dtype)
        q = torch.randn(sum(ql), hq, d, generator=g).to(dtype)
        out = b.attention(q, cache, meta, 0.125)
        ref = nat.attention(q.double().float(), cache.float(), meta, 0.125)
        assert nmse(out, ref) < (1e-10 if dtype == torch.float32 else 3e-5)
        for i in range(2):
            one, _ = _meta([ctx[i]], [1], window=window)
            one.block_tables = meta.block_tables[i:i + 1]
            alone = b.attention(q[i:i + 1], cache, one, 0.125)
            assert torch.equal(alone, out[i:i + 1]), (window, i)


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_many_decode_rows_match_each_row_alone(tier, dtype):
    """Enough decode rows that a work item takes all kv heads of a row's span (hs_attention's
    hpi; a row alone takes one head an item): every row bit-equal to itself alone, and the
    batch within the NMSE bound of native. Contexts from 1 key to past two spans, TinyLlama's
    head shape (8 query heads a kv head), a sliding window too."""
    b, nat = backend(tier, batch_invariant=True), NativeBackend()
    g = torch.Generator().manual_seed(11)
    hq, hk, d = 16, 2, 64
    base = [1, 16, 17, 129, 136, 255, 256, 257, 300, 520, 33, 144]  # 16 spans of 256 keys
    ctx = base * max(6, -(-4 * b.threads // 16))  # spans >= 4 x threads: one item takes all kv heads
    for window in (None, 100):
        meta, nblk = _meta(ctx, [1] * len(ctx), window=window)
        cache = torch.randn(2, nblk, 16, hk, d, generator=g).to(dtype)
        q = torch.randn(len(ctx), hq, d, generator=g).to(dtype)
        out = b.attention(q, cache, meta, 0.125)
        ref = nat.attention(q.double().float(), cache.float(), meta, 0.125)
        assert nmse(out, ref) < (1e-10 if dtype == torch.float32 else 3e-5)
        for i in range(len(ctx)):
            one, _ = _meta([ctx[i]], [1], window=window)
            one.block_tables = meta.block_tables[i:i + 1]
            assert torch.equal(b.attention(q[i:i + 1], cache, one, 0.125), out[i:i + 1]), (window, i)


@pytest.mark.parametrize("tier", RUNNABLE[1:])
def test_conformance_quick_cases_per_tier(tier):
    """The conformance suite's quick cases on each lower tier's build (tests/conformance
    runs the tier the probe picks)."""
    b = backend(tier)
    bad = []
    for case in C.cases(quick=True):
        res = C.run_case(b, case)
        if not res.how.startswith("accelerated"):
            continue  # native ops (sample, block copies) do not differ between tiers
        if res.status == "FAIL":
            bad.append(res.line())
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("preset", ["llama", "qwen3_moe"])
def test_greedy_matches_transformers_float32(checkpoint, preset):
    path = checkpoint(preset)
    b = CpuAmxBackend()
    model, cfg = load_model(path, b)
    assert cfg.dtype == torch.float32
    ids = prompt()
    ours, generated = run_greedy(model, cfg, b, ids, DECODE_STEPS)
    ref = hf_logits(path, ids + generated)[:-1]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ref[PROMPT_LEN - 1:].argmax(-1).tolist() == generated
    assert len(set(generated)) > 1


@pytest.mark.parametrize("scheme,floor", [("int8_w8a8", 0.99), ("int4_g32", 0.9)])
def test_quantized_models_track_float(checkpoint, scheme, floor):
    path = checkpoint("llama")
    b = CpuAmxBackend()
    ids = prompt()
    ref, _ = run_greedy(*load_model(path, b), b, ids, 0)
    model, cfg = load_model(path, b, quantization=scheme)
    ours, _ = run_greedy(model, cfg, b, ids, 0)
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    # random tiny weights are int4's worst case (no outliers to spare); docs/cpu_amx.md has
    # the measured figures
    assert cos.mean() > floor, (scheme, cos)


@pytest.mark.parametrize("scheme,floor", [("int8", 0.99), ("int4_g32", 0.9)])
def test_quantized_lm_head(checkpoint, scheme, floor):
    """quantize_lm_head: the output projection runs this backend's kernel for the scheme at the
    vocabulary's width, its logits the dequantized weight's (float64), and greedy decode still
    tracks the float model."""
    from halserve.hal.cpu_amx.quant import dequant_any

    path = checkpoint("llama")
    b = CpuAmxBackend()
    ids = prompt()
    ref, _ = run_greedy(*load_model(path, b), b, ids, 0)
    model, cfg = load_model(path, b, quantization=scheme, quantize_lm_head=True)
    w = model.lm_head.weight
    assert w.scheme == scheme.split("_g")[0] and w.out_features == cfg.vocab_size
    for rows in (1, 3):
        h = torch.randn(rows, w.in_features, generator=torch.Generator().manual_seed(rows))
        want = h.double() @ dequant_any(w, torch.float64).T
        got = model.lm_head(h).double()
        assert nmse(got, want) < 1e-10
    ours, _ = run_greedy(model, cfg, b, ids, 0)
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=-1).mean() > floor


def test_schemes_a_backend_cannot_run_are_refused_by_name(checkpoint):
    path = checkpoint("llama")
    with pytest.raises(ModelLoadError, match="cannot run quantization 'int4'"):
        load_model(path, NativeBackend(), quantization="int4")
    with pytest.raises(ModelLoadError, match="'int3' is not supported; use None, fp8, int8, int8_w8a8, int4"):
        load_model(path, CpuAmxBackend(), quantization="int3")


@pytest.mark.parametrize("scheme", ["none", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_small_batch_fused_kernel(monkeypatch, scheme, dtype):
    """Decode-size batches take the fused C kernel (all (token, expert) pairs in one region);
    it must agree with the per-expert path and with native."""
    from halserve.hal.cpu_amx import backend as B
    from halserve.hal.interface import MoeSpec

    b, nat = CpuAmxBackend(), NativeBackend()
    g = torch.Generator().manual_seed(4)
    e, h, inter = 8, 128, 96
    w13 = b.pack_weight((torch.randn(e, 2 * inter, h, generator=g) * h ** -0.5).to(dtype), scheme)
    w2 = b.pack_weight((torch.randn(e, h, inter, generator=g) * inter ** -0.5).to(dtype), scheme)
    assert b._moe_kind(w13, w2, dtype) is not None
    spec = MoeSpec(top_k=3)
    for t in (1, 5):
        x = torch.randn(t, h, generator=g).to(dtype)
        logits = torch.randn(t, e, generator=g)
        fused = b.moe(x, logits, w13, w2, spec)
        monkeypatch.setattr(B, "MOE_SMALL_T", 0)
        looped = b.moe(x, logits, w13, w2, spec)
        monkeypatch.setattr(B, "MOE_SMALL_T", 8)
        ref = nat.moe(x, logits, w13, w2, spec)
        limit = 1e-10 if dtype == torch.float32 else 3e-5
        assert nmse(fused, looped) < limit and nmse(fused, ref) < limit, (t, nmse(fused, ref))


@pytest.mark.parametrize("tier", RUNNABLE)
def test_attention_query_rows_past_the_last_sequence_are_zero(tier):
    """A padded step (a graph bucket's spare rows) may pass more query rows than its
    sequences own: those rows read no sequence's keys and come out zero; the real rows are
    what they are without the padding."""
    b = backend(tier)
    g = torch.Generator().manual_seed(5)
    hq, hk, d = 8, 2, 64
    meta, nblk = _meta([300, 20], [1, 3])
    cache = torch.randn(2, nblk, 16, hk, d, generator=g)
    q = torch.randn(4, hq, d, generator=g)
    real = b.attention(q, cache, meta, 0.125)
    padded = torch.cat([q, torch.full((5, hq, d), float("nan"))])
    out = b.attention(padded, cache, meta, 0.125)
    assert torch.equal(out[:4], real)
    assert torch.equal(out[4:], torch.zeros(5, hq, d))
