"""NativeBackend against the float64 oracles (reference.py) and plain-torch ground truth."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from halserve.hal import reference as R
from halserve.hal.interface import AttentionMetadata, MoeSpec, SamplingTensors
from halserve.hal.native import NativeBackend
from halserve.hal.rng import counter_uniform
from halserve.hal.rope import build_rope_cache, rope_params_from_hf_config

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# NMSE bounds vs float64: fp32 is near-exact, half types carry their rounding.
TOL = {torch.float32: 1e-10, torch.bfloat16: 5e-5, torch.float16: 5e-6}


@pytest.fixture(scope="module")
def hal():
    return NativeBackend()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_probe_and_supports(hal):
    p = NativeBackend.probe()
    assert p.score == 1 and p.reason == "pure torch, runs everywhere"
    assert hal.device == torch.device("cpu")
    assert hal.supports("attention") is True
    assert hal.supports("nope").startswith("refused:")
    assert hal.supports("linear", scheme="nvfp4").startswith("refused:")
    free, total = hal.memory_info()
    assert 0 < free <= total


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (7, 769, 5125), (33, 128, 257)])
def test_linear(hal, dtype, m, k, n):
    g = gen()
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    pw = hal.pack_weight(w)
    y = hal.linear(x, pw, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert R.nmse(y, R.linear(x, pw, bias)) < TOL[dtype] * 10
    out = torch.empty(m, n, dtype=dtype)
    assert hal.linear(x, pw, bias, out=out) is out
    torch.testing.assert_close(out, y)


@pytest.mark.parametrize("scheme", ["int8", "fp8", "fp8_per_tensor", "fp8_weight_only"])
def test_linear_quantized(hal, scheme):
    g = gen(1)
    x = torch.randn(9, 256, generator=g)
    w = torch.randn(96, 256, generator=g)
    pw = hal.pack_weight(w, scheme)
    assert pw.scheme == scheme[:4].rstrip("_") and pw.out_features == 96 and pw.in_features == 256
    assert pw.scale.shape == ((1,) if scheme == "fp8_per_tensor" else (96,))
    y = hal.linear(x, pw)
    # Same quantized math in float64: near-exact; vs the unquantized GEMM: quantization noise.
    assert R.nmse(y, R.linear(x, pw)) < 1e-10
    bound = 1e-4 if scheme == "int8" else 5e-3
    assert R.nmse(y, x.double() @ w.double().T) < bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm(hal, dtype, fused):
    g = gen(2)
    x = torch.randn(13, 320, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(320, generator=g)).to(dtype)
    if not fused:
        y = hal.rms_norm(x, w, 1e-6)
        assert R.nmse(y, R.rms_norm(x, w, 1e-6)) < TOL[dtype]
        truth = F.rms_norm(x.float(), (320,), w.float(), 1e-6)
        assert R.nmse(y, truth) < TOL[dtype]
        return
    res = torch.randn(13, 320, generator=g).to(dtype)
    x0, res0 = x.clone(), res.clone()
    y, h = hal.rms_norm(x, w, 1e-6, residual=res)
    ry, rh = R.rms_norm(x, w, 1e-6, residual=res)
    assert R.nmse(h, rh) < TOL[dtype] and R.nmse(y, ry) < TOL[dtype]
    assert torch.equal(x, x0) and torch.equal(res, res0)


def _hf_rope(q, pos, cache, is_neox):
    """Ground truth in the HF formulation (rotate_half on full-dim q, or gpt-j pairs)."""
    rot = cache.shape[-1]
    cos, sin = cache[pos, : rot // 2].double(), cache[pos, rot // 2:].double()
    q = q.double().clone()
    part = q[..., :rot]
    if is_neox:
        c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        half = rot // 2
        rotated = torch.cat([-part[..., half:], part[..., :half]], -1)
        q[..., :rot] = part * c + rotated * s
    else:
        c = cos.repeat_interleave(2, -1)[:, None]
        s = sin.repeat_interleave(2, -1)[:, None]
        rotated = torch.stack([-part[..., 1::2], part[..., 0::2]], -1).flatten(-2)
        q[..., :rot] = part * c + rotated * s
    return q


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_rotary(hal, dtype, is_neox, rot_dim):
    g = gen(3)
    cache = build_rope_cache(64, rot_dim, 512, 10000.0)
    pos = torch.randint(0, 512, (11,), generator=g)
    q = torch.randn(11, 4, 64, generator=g).to(dtype)
    k = torch.randn(11, 2, 64, generator=g).to(dtype)
    q0, k0 = q.clone(), k.clone()
    hal.rotary(pos, q, k, cache, is_neox)
    rq, rk = R.rotary(pos, q0, k0, cache, is_neox)
    assert R.nmse(q, rq) < TOL[dtype] and R.nmse(k, rk) < TOL[dtype]
    assert R.nmse(q, _hf_rope(q0, pos, cache, is_neox)) < TOL[dtype]
    if rot_dim < 64:  # the pass-through dims are untouched
        assert torch.equal(q[..., rot_dim:], q0[..., rot_dim:])


def test_rotary_on_strided_views(hal):
    qkv = torch.randn(5, (4 + 2 + 2) * 32)
    q = qkv[:, : 4 * 32].view(5, 4, 32)
    k = qkv[:, 4 * 32: 6 * 32].view(5, 2, 32)
    q0, k0, v0 = q.clone(), k.clone(), qkv[:, 6 * 32:].clone()
    cache = build_rope_cache(32, 32, 64, 10000.0)
    pos = torch.arange(5)
    hal.rotary(pos, q, k, cache)
    rq, rk = R.rotary(pos, q0, k0, cache)
    assert R.nmse(qkv[:, : 4 * 32].view(5, 4, 32), rq) < 1e-10
    assert torch.equal(qkv[:, 6 * 32:], v0)


def test_rope_cache_textbook():
    cache = build_rope_cache(128, 128, 2048, 500000.0)
    assert cache.shape == (2048, 128) and cache.dtype == torch.float32
    assert R.nmse(cache, R.rope_cache(128, 2048, 500000.0)) < 1e-9


def _hf_rope_table(cfg_kwargs, max_pos):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=max_pos, **cfg_kwargs)
    emb = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(max_pos)[None]
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0, :, :32], sin[0, :, :32], cfg


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    {"type": "linear", "factor": 2.0},  # the pre-4.45 key name
])
def test_rope_cache_matches_transformers(scaling):
    pytest.importorskip("transformers")
    kwargs = {"rope_theta": 50000.0}
    if scaling is not None:
        kwargs["rope_scaling"] = dict(scaling)
    cos, sin, cfg = _hf_rope_table(kwargs, 1024)
    base, sc = rope_params_from_hf_config(cfg.to_dict())
    assert base == 50000.0
    cache = build_rope_cache(64, 64, 1024, base, sc)
    assert torch.equal(cache[:, :32], cos) and torch.equal(cache[:, 32:], sin)


def test_rope_params_both_config_forms():
    old = {"rope_theta": 1e6, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0}, "max_position_embeddings": 4096}
    new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0}, "max_position_embeddings": 4096}
    for cfg in (old, new):
        base, sc = rope_params_from_hf_config(cfg)
        assert base == 1e6 and sc["rope_type"] == "llama3"
        assert sc["original_max_position_embeddings"] == 4096
    assert rope_params_from_hf_config({"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}) == (5.0, None)
    assert rope_params_from_hf_config({}) == (10000.0, None)
    nested = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 7.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 3.0}}}
    assert rope_params_from_hf_config(nested) == (7.0, None)
    with pytest.raises(ValueError, match="longrope"):
        build_rope_cache(64, 64, 16, 1e4, {"rope_type": "longrope"})


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(hal, dtype):
    x = torch.randn(9, 2 * 176, generator=gen(4)).to(dtype)
    x0 = x.clone()
    y = hal.silu_and_mul(x)
    assert y.shape == (9, 176)
    assert torch.equal(x, x0)  # the input is read only (a float32 x is its own upcast)
    assert R.nmse(y, R.silu_and_mul(x)) < TOL[dtype]
    assert R.nmse(y, F.silu(x[:, :176].double()) * x[:, 176:].double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv(hal, dtype):
    g = gen(5)
    cache = torch.randn(2, 6, 16, 2, 32, generator=g).to(dtype)
    key = torch.randn(10, 2, 32, generator=g).to(dtype)
    val = torch.randn(10, 2, 32, generator=g).to(dtype)
    slots = torch.tensor([3, -1, 17, 95, -1, 0, 40, 41, -1, 64])
    expected = R.write_kv(key, val, cache, slots)
    hal.write_kv(key, val, cache, slots)
    assert torch.equal(cache, expected)
    # all padding: nothing changes
    before = cache.clone()
    hal.write_kv(key[:3], val[:3], cache, torch.full((3,), -1))
    assert torch.equal(cache, before)
    hal.write_kv(key[:0], val[:0], cache, slots[:0])
    assert torch.equal(cache, before)


def make_attention_case(seq_lens, query_lens, bs, hq, hk, d, dtype=torch.float32, seed=0,
                        sliding_window=None):
    """Random paged cache with shuffled block tables (the conformance suite's builder)."""
    from halserve.hal.conformance import paged_attention_case

    return paged_attention_case(seq_lens, query_lens, bs, hq, hk, d, dtype, gen(seed), window=sliding_window)


def _sdpa_truth(q, kv, meta, scale):
    """Plain-torch ground truth: dense per-sequence SDPA with an explicit mask."""
    outs = []
    bs = meta.block_size
    for i, (ql, sl) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        qs = q[meta.cu_seqlens_q[i]:meta.cu_seqlens_q[i + 1]].double().transpose(0, 1)
        slots = [int(meta.block_tables[i, p // bs]) * bs + p % bs for p in range(sl)]
        k = kv[0].reshape(-1, *kv.shape[-2:])[slots].double().transpose(0, 1)
        v = kv[1].reshape(-1, *kv.shape[-2:])[slots].double().transpose(0, 1)
        mask = torch.ones(ql, sl, dtype=torch.bool).tril(sl - ql)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 4, 64, 16), (8, 2, 128, 32), (8, 1, 80, 16)])
def test_attention_mixed_batch(hal, dtype, hq, hk, d, bs):
    # decode, decode, chunked prefill with cached prefix crossing blocks, fresh prefill
    seqs, qls = [45, 1, 70, 19], [1, 1, 23, 19]
    q, kv, meta = make_attention_case(seqs, qls, bs, hq, hk, d, dtype)
    scale = d ** -0.5
    out = torch.full_like(q, float("nan"))
    assert hal.attention(q, kv, meta, scale, out=out) is out
    assert R.nmse(out, R.attention(q, kv, meta, scale)) < TOL[dtype]
    assert R.nmse(out, _sdpa_truth(q, kv, meta, scale)) < TOL[dtype]


def test_attention_sliding_window(hal):
    q, kv, meta = make_attention_case([40, 1, 33], [40, 1, 8], 16, 4, 2, 64, sliding_window=9)
    out = hal.attention(q, kv, meta, 0.1)
    assert R.nmse(out, R.attention(q, kv, meta, 0.1)) < 1e-10


def _moe_case(e, top_k, t=11, h=64, inter=48, seed=6, **spec_kw):
    g = gen(seed)
    x = torch.randn(t, h, generator=g)
    logits = torch.randn(t, e, generator=g)
    w13 = torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, inter, generator=g) / inter ** 0.5
    return x, logits, w13, w2, MoeSpec(top_k=top_k, **spec_kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_softmax(hal, dtype):
    x, logits, w13, w2, spec = _moe_case(8, 2)
    x = x.to(dtype)
    p13, p2 = hal.pack_weight(w13.to(dtype)), hal.pack_weight(w2.to(dtype))
    y = hal.moe(x, logits, p13, p2, spec)
    assert R.nmse(y, R.moe(x, logits, p13, p2, spec)) < TOL[dtype] * 20
    # ground truth in the Mixtral formulation: softmax over the top-k logits
    top = logits.double().topk(2, dim=-1)
    wts = torch.softmax(top.values, dim=-1)
    truth = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(2):
            e = int(top.indices[t, j])
            gu = w13[e].to(dtype).double() @ x[t].double()
            truth[t] += wts[t, j] * (w2[e].to(dtype).double() @ (F.silu(gu[:48]) * gu[48:]))
    assert R.nmse(y, truth) < TOL[dtype] * 20


def test_moe_sigmoid_grouped(hal):
    g = gen(7)
    x, logits, w13, w2, _ = _moe_case(64, 8, t=9, seed=7)
    bias = torch.randn(64, generator=g) * 0.1
    spec = MoeSpec(top_k=8, scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=3,
                   correction_bias=bias, routed_scaling_factor=2.5)
    p13, p2 = hal.pack_weight(w13), hal.pack_weight(w2)
    y = hal.moe(x, logits, p13, p2, spec)
    assert R.nmse(y, R.moe(x, logits, p13, p2, spec)) < 1e-10
    # the chosen experts come from at most topk_group groups
    from halserve.hal.routing import route
    _, ids = route(logits, spec)
    assert all(len(set((row // 8).tolist())) <= 3 for row in ids)


def test_moe_quantized_int8(hal):
    x, logits, w13, w2, spec = _moe_case(8, 2)
    p13, p2 = hal.pack_weight(w13, "int8"), hal.pack_weight(w2, "int8")
    assert p13.scale.shape == (8, 96)
    y = hal.moe(x, logits, p13, p2, spec)
    assert R.nmse(y, R.moe(x, logits, p13, p2, spec)) < 1e-10


def test_swap_blocks_reuses_one_mapping_for_many_layers(hal):
    """One mapping moving every layer in turn is uploaded once; another mapping (the same
    shape, other rows), or a staging-buffer one (source rows 0..n-1), is not confused with it."""
    g = gen(9)
    layers = [torch.randn(2, 8, 4, 2, 8, generator=g) for _ in range(3)]
    a, b, staged = torch.tensor([[7, 0], [2, 3]]), torch.tensor([[1, 4], [6, 2]]), torch.tensor([[0, 1], [1, 0]])
    for m in (a, a, b, a, staged, staged, b):
        for src in layers:
            dst = torch.randn(2, 5, 4, 2, 8, generator=g)
            expected = R.swap_blocks(src, dst, m)
            hal.swap_blocks(src, dst, m)
            assert torch.equal(dst, expected)


def test_swap_and_copy_blocks(hal):
    g = gen(8)
    src = torch.randn(2, 8, 16, 2, 8, generator=g).to(torch.bfloat16)
    dst = torch.randn(2, 5, 16, 2, 8, generator=g).to(torch.bfloat16)
    mapping = torch.tensor([[7, 0], [2, 3], [5, 4]])
    expected = R.swap_blocks(src, dst, mapping)
    hal.swap_blocks(src, dst, mapping)
    assert torch.equal(dst, expected)
    caches = [torch.randn(2, 8, 4, 1, 8, generator=g) for _ in range(3)]
    mapping = torch.tensor([[0, 5], [1, 6], [5, 7]])  # 5 is read before it is written
    expected = R.copy_blocks(caches, mapping)
    hal.copy_blocks(caches, mapping)
    assert all(torch.equal(a, b) for a, b in zip(caches, expected))


def sampling_params(b, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, steps=None):
    def full(v, dt):
        return v.to(dt) if isinstance(v, torch.Tensor) else torch.full((b,), v, dtype=dt)
    temp = full(temperature, torch.float32)
    tk, tp, mp = full(top_k, torch.int32), full(top_p, torch.float32), full(min_p, torch.float32)
    return SamplingTensors(
        temperature=temp, top_k=tk, top_p=tp, min_p=mp,
        seeds=full(seeds if seeds is not None else 1234, torch.int64),
        steps=full(steps if steps is not None else 0, torch.int64),
        all_greedy=bool((temp == 0).all()), all_random=bool((temp > 0).all()),
        no_top_k=bool(((tk <= 0) | (tk >= 10**9)).all()), no_top_p=bool((tp >= 1).all()),
        no_min_p=bool((mp <= 0).all()))


def test_sample_greedy(hal):
    logits = torch.randn(6, 1000, generator=gen(9))
    tok = hal.sample(logits, sampling_params(6, temperature=0.0))
    assert tok.dtype == torch.int64 and torch.equal(tok, logits.argmax(-1))
    # mixed batch: greedy rows stay exact next to random ones
    temp = torch.tensor([0.0, 1.0, 0.0, 0.7, 1.3, 0.0])
    tok = hal.sample(logits, sampling_params(6, temperature=temp, top_k=5))
    assert torch.equal(tok[temp == 0], logits.argmax(-1)[temp == 0])


def test_sample_seeded_and_row_independent(hal):
    logits = torch.randn(8, 500, generator=gen(10))
    seeds = torch.arange(8) * 7919 + 1
    steps = torch.arange(8) + 3
    p = sampling_params(8, temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, seeds=seeds, steps=steps)
    a = hal.sample(logits, p)
    assert torch.equal(a, hal.sample(logits, p))
    for r in (0, 5):
        pr = sampling_params(1, temperature=0.9, top_k=50, top_p=0.9, min_p=0.01,
                             seeds=seeds[r:r + 1], steps=steps[r:r + 1])
        assert hal.sample(logits[r:r + 1], pr)[0] == a[r]
    # a different step gives a fresh draw (over many rows, some differ)
    big = logits[:1].expand(64, -1)
    t1 = hal.sample(big, sampling_params(64, steps=torch.arange(64)))
    assert len(set(t1.tolist())) > 5


def test_counter_uniform_properties():
    seeds = torch.tensor([0, 1, -5, 2**62 + 3])
    u = counter_uniform(seeds, torch.tensor([0, 0, 7, 2**40]), 4096)
    assert u.dtype == torch.float32 and (u > 0).all() and (u < 1).all()
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert not torch.equal(u[0], u[1])
    many = counter_uniform(torch.zeros(200, dtype=torch.int64), torch.arange(200), 1000)
    hist = torch.histc(many, bins=10, min=0, max=1) / many.numel()
    assert (hist - 0.1).abs().max() < 0.01


@pytest.mark.parametrize("kw", [dict(top_k=7), dict(top_p=0.5), dict(min_p=0.2),
                                dict(top_k=20, top_p=0.8, min_p=0.05, temperature=0.6)])
def test_sample_stays_in_allowed_set(hal, kw):
    logits = torch.randn(1, 300, generator=gen(11)) * 3
    n = 2000
    p = sampling_params(n, steps=torch.arange(n), **kw)
    tok = hal.sample(logits.expand(n, -1).contiguous(), p)
    target = R.sampling_probs(logits.expand(1, -1), sampling_params(1, **kw))[0]
    allowed = set((target > 0).nonzero().flatten().tolist())
    assert set(tok.tolist()) <= allowed
    # and it matches the target distribution (total variation, loose for n=2000)
    freq = torch.bincount(tok, minlength=300).double() / n
    assert 0.5 * float((freq - target).abs().sum()) < 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariant_linear_and_moe(dtype):
    hal = NativeBackend(batch_invariant=True)
    g = gen(12)
    w = hal.pack_weight((torch.randn(1031, 769, generator=g) / 28).to(dtype))
    x = torch.randn(70, 769, generator=g).to(dtype)
    alone = hal.linear(x[5:6], w)[0]
    for lo, hi in ((4, 6), (3, 40), (5, 70), (0, 70)):
        assert torch.equal(hal.linear(x[lo:hi], w)[5 - lo], alone)
    xm, logits, w13, w2, spec = _moe_case(8, 2, t=40)
    xm = xm.to(dtype)
    p13, p2 = hal.pack_weight(w13.to(dtype)), hal.pack_weight(w2.to(dtype))
    one = hal.moe(xm[7:8], logits[7:8], p13, p2, spec)[0]
    for lo, hi in ((0, 8), (7, 40), (0, 40)):
        assert torch.equal(hal.moe(xm[lo:hi], logits[lo:hi], p13, p2, spec)[7 - lo], one)


def test_batch_invariant_attention():
    hal = NativeBackend(batch_invariant=True)
    q, kv, meta = make_attention_case([45, 1, 70, 19], [1, 1, 23, 19], 16, 8, 2, 64)
    full = hal.attention(q, kv, meta, 0.125)
    q1, m1 = q[0:1], AttentionMetadata(
        meta.cu_seqlens_q[:2], meta.seq_lens[:1], meta.block_tables[:1], meta.slot_mapping[:1], 1, 45,
        [1], [45], 16, 1)
    assert torch.equal(hal.attention(q1, kv, m1, 0.125)[0], full[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_paths_match_the_composite_bitwise(hal, dtype):
    """rms_norm (fused on CPU), rotary and silu_and_mul compute exactly what the op-by-op
    float32 formulas (the reference semantics, HF's order) compute."""
    g = gen(11)
    x, res = (torch.randn(9, 256, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(256, generator=g)).to(dtype)
    h = (x.float() + res.float()).to(dtype)
    hf = h.float()
    want = (hf * torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * w.float()).to(dtype)
    y, h2 = hal.rms_norm(x, w, 1e-6, residual=res)
    assert torch.equal(h2, h) and torch.equal(y, want)
    assert torch.equal(hal.rms_norm(h, w, 1e-6), want)
    cache = build_rope_cache(64, 64, 128, 10000.0)
    pos = torch.randint(0, 128, (9,), generator=g)
    q, k = torch.randn(9, 8, 64, generator=g).to(dtype), torch.randn(9, 2, 64, generator=g).to(dtype)
    cos, sin = cache[pos, None, :32], cache[pos, None, 32:]
    wants = []
    for t in (q, k):
        x1, x2 = t[..., :32].float(), t[..., 32:].float()
        wants.append(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(dtype))
    hal.rotary(pos, q, k, cache, True)
    assert torch.equal(q, wants[0]) and torch.equal(k, wants[1])
    gu = torch.randn(9, 96, generator=g).to(dtype)
    assert torch.equal(hal.silu_and_mul(gu), (F.silu(gu[:, :48].float()) * gu[:, 48:].float()).to(dtype))


def test_decode_gather_rows_are_reused_per_step_not_across_steps(hal):
    """The decode batch's gather rows are built once per metadata and reused by every layer:
    a second layer's cache reads right, and a new step with the same lengths but other
    block tables never reads the old rows."""
    lens = [37, 5, 64, 20]
    q, kv, meta = make_attention_case(lens, [1] * 4, 16, 8, 2, 64, seed=1)
    _, kv2, _ = make_attention_case(lens, [1] * 4, 16, 8, 2, 64, seed=2)  # another layer, same tables
    kv2 = kv2[:, torch.randperm(kv2.shape[1], generator=gen(3))] if kv2.shape == kv.shape else kv2
    for cache in (kv, kv2, kv):
        out = hal.attention(q, cache, meta, 0.125)
        assert R.nmse(out, _sdpa_truth(q, cache, meta, 0.125)) < 1e-10
    q3, kv3, meta3 = make_attention_case(lens, [1] * 4, 16, 8, 2, 64, seed=4)  # next step
    assert not torch.equal(meta3.block_tables, meta.block_tables)
    out = hal.attention(q3, kv3, meta3, 0.125)
    assert R.nmse(out, _sdpa_truth(q3, kv3, meta3, 0.125)) < 1e-10
