"""The shared Triton kernels against the native backend, on the CPU under TRITON_INTERPRET=1
(or on a GPU when there is one). Small odd shapes; fp32 and fp16 (the interpreter gets bf16
wrong, so bf16 is left to the GPU tests)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.helpers.triton_here import DEV, ON_GPU  # noqa: E402 (first: it sets the interpreter up)

from halserve.hal.interface import AttentionMetadata, MoeSpec, SamplingTensors  # noqa: E402
from halserve.hal.native import NativeBackend, build_rope_cache  # noqa: E402

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(scope="module")
def cuda():
    from halserve.hal.cuda import CudaBackend

    return CudaBackend(DEV)


@pytest.fixture(scope="module")
def native():
    return NativeBackend(DEV)


def nmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any()
    return ((a - b) ** 2).sum().item() / max((b ** 2).sum().item(), 1e-30)


def tol(dtype) -> float:
    return 1e-10 if dtype == torch.float32 else 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm(cuda, native, dtype, with_res):
    torch.manual_seed(0)
    x = torch.randn(7, 131, dtype=dtype, device=DEV)
    w = torch.randn(131, dtype=dtype, device=DEV)
    r = torch.randn(7, 131, dtype=dtype, device=DEV) if with_res else None
    got = cuda.rms_norm(x, w, 1e-6, r)
    ref = native.rms_norm(x, w, 1e-6, r)
    if with_res:
        assert torch.equal(got[1], ref[1])
        got, ref = got[0], ref[0]
    assert nmse(got, ref) < tol(dtype)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rot_dim", [32, 16])
def test_rotary(cuda, native, neox, rot_dim):
    torch.manual_seed(0)
    T, hq, hk, d = 5, 6, 2, 32
    cache = build_rope_cache(d, rot_dim, 64, 10000.0, device=DEV)
    qkv = torch.randn(T, (hq + 2 * hk) * d, device=DEV)  # q, k as strided views, as models pass them
    q, k = qkv[:, : hq * d].view(T, hq, d), qkv[:, hq * d:(hq + hk) * d].view(T, hk, d)
    q2, k2 = q.clone(), k.clone()
    pos = torch.tensor([0, 3, 63, 7, 8], device=DEV)
    cuda.rotary(pos, q, k, cache, neox)
    native.rotary(pos, q2, k2, cache, neox)
    assert nmse(q, q2) < 1e-12 and nmse(k, k2) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(cuda, native, dtype):
    x = torch.randn(3, 2 * 77, dtype=dtype, device=DEV)
    assert nmse(cuda.silu_and_mul(x), native.silu_and_mul(x)) < tol(dtype)


def test_write_kv(cuda, native):
    hk, d, bs = 2, 24, 4
    c1 = torch.randn(2, 6, bs, hk, d, device=DEV)
    c2 = c1.clone()
    key, val = torch.randn(5, hk, d, device=DEV), torch.randn(5, hk, d, device=DEV)
    slots = torch.tensor([3, -1, 17, 0, -1], device=DEV)
    cuda.write_kv(key, val, c1, slots)
    native.write_kv(key, val, c2, slots)
    assert torch.equal(c1, c2)


def _meta(qlens, slens, bs, nblocks, device, window=None):
    maxb = max((s + bs - 1) // bs for s in slens)
    perm = torch.randperm(nblocks)[: len(slens) * maxb].view(len(slens), maxb).to(torch.int32)
    cu = [0]
    for q in qlens:
        cu.append(cu[-1] + q)
    slots = []
    for i, (q, s) in enumerate(zip(qlens, slens)):
        slots += [int(perm[i, p // bs]) * bs + p % bs for p in range(s - q, s)]
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(slens, dtype=torch.int32, device=device),
        block_tables=perm.to(device), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_seqlen_q=max(qlens), max_seqlen_k=max(slens), query_lens_host=list(qlens),
        seq_lens_host=list(slens), block_size=bs, num_decode_seqs=0, sliding_window=window)


ATTN_CASES = [
    ([9, 1, 17], [9, 40, 30], None),  # prefill, decode, prefill with cached prefix
    ([1, 1, 1], [3, 70, 33], None),  # decode only (split-KV)
    ([3, 20], [50, 20], 8),  # sliding window
    ([4, 2], [250, 200], None),  # short chunks over long cached prefixes (split-KV prefill)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qlens,slens,window", ATTN_CASES)
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_attention(native, dtype, qlens, slens, window, batch_invariant):
    from halserve.hal.cuda import CudaBackend

    torch.manual_seed(1)
    be = CudaBackend(DEV, batch_invariant=batch_invariant)
    hq, hk, d, bs = 8, 2, 32, 16
    cache = torch.randn(2, 32, bs, hk, d, dtype=dtype, device=DEV)
    meta = _meta(qlens, slens, bs, 32, DEV, window)
    q = torch.randn(sum(qlens), hq, d, dtype=dtype, device=DEV)
    got = be.attention(q, cache, meta, 1 / math.sqrt(d))
    ref = native.attention(q, cache, meta, 1 / math.sqrt(d))
    assert nmse(got, ref) < tol(dtype) * 10


def test_attention_row_invariance():
    """A sequence's output is bitwise the same alone and inside a mixed batch (one config)."""
    from halserve.hal.cuda import CudaBackend

    torch.manual_seed(2)
    be = CudaBackend(DEV, batch_invariant=True)
    hq, hk, d, bs = 4, 1, 32, 8
    cache = torch.randn(2, 40, bs, hk, d, device=DEV)
    meta = _meta([1, 5, 1], [20, 25, 33], bs, 40, DEV)
    q = torch.randn(7, hq, d, device=DEV)
    full = be.attention(q, cache, meta, 0.2)
    alone = AttentionMetadata(torch.tensor([0, 5], dtype=torch.int32, device=DEV), meta.seq_lens[1:2],
                              meta.block_tables[1:2], meta.slot_mapping[1:6], 5, 25, [5], [25], bs)
    one = be.attention(q[1:6].contiguous(), cache, alone, 0.2)
    assert torch.equal(one, full[1:6])


@pytest.mark.parametrize("scheme", ["none", "fp8", "fp8_per_tensor", "fp8_weight_only"])
def test_linear(cuda, native, scheme):
    torch.manual_seed(3)
    x = torch.randn(9, 64, device=DEV)
    w = native.pack_weight(torch.randn(48, 64, device=DEV) * 0.1, scheme)
    b = torch.randn(48, device=DEV)
    assert nmse(cuda.linear(x, w, b), native.linear(x, w, b)) < 1e-8


def test_persistent_matmul_rows_invariant():
    from halserve.hal.cuda import CudaBackend

    be = CudaBackend(DEV, batch_invariant=True)
    torch.manual_seed(4)
    x = torch.randn(37, 80, device=DEV)
    w = NativeBackend(DEV).pack_weight(torch.randn(45, 80, device=DEV))
    full = be.linear(x, w)
    assert nmse(full, x.double() @ w.weight.double().T) < 1e-10
    for i in (0, 17, 36):
        assert torch.equal(be.linear(x[i:i + 1], w), full[i:i + 1])


def test_persistent_matmul_tile_order_changes_nothing():
    """Grouped tile order (GROUP_M row tiles at a time) gives bitwise the plain order's output."""
    from halserve.hal.triton import configs
    from halserve.hal.triton.matmul import persistent_matmul

    torch.manual_seed(5)
    x = torch.randn(83, 80, device=DEV)
    w = torch.randn(70, 80, device=DEV)
    cfg = configs.matmul_fixed_config(70, 80)
    plain = persistent_matmul(x, w, cfg=dict(cfg, GROUP_M=1))
    assert nmse(plain, x.double() @ w.double().T) < 1e-10
    for g in (2, 3, 8):  # into NaNs: a tile the order skips must show
        out = torch.full_like(plain, float("nan"))
        assert torch.equal(persistent_matmul(x, w, out=out, cfg=dict(cfg, GROUP_M=g, PROGS_PER_SM=1)), plain)


@pytest.mark.parametrize("scheme", ["none", "fp8", "fp8_per_tensor"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_moe(cuda, native, scheme, scoring):
    torch.manual_seed(5)
    T, H, I, E, k = 11, 32, 24, 8, 3
    x = torch.randn(T, H, device=DEV)
    rl = torch.randn(T, E, device=DEV)
    w13 = native.pack_weight(torch.randn(E, 2 * I, H, device=DEV) * 0.2, scheme)
    w2 = native.pack_weight(torch.randn(E, H, I, device=DEV) * 0.2, scheme)
    spec = MoeSpec(top_k=k, scoring=scoring, renormalize=scoring == "softmax")
    assert nmse(cuda.moe(x, rl, w13, w2, spec), native.moe(x, rl, w13, w2, spec)) < 1e-10


@pytest.mark.parametrize("masks", [False, True])
def test_sample_matches_native(cuda, native, masks):
    torch.manual_seed(6)
    B, V = 6, 700
    logits = torch.randn(B, V, device=DEV) * 3
    temp = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.5, 2.0], device=DEV)
    seeds = torch.randint(-2**62, 2**62, (B,), device=DEV)
    steps = torch.randint(0, 2**40, (B,), device=DEV)
    p = SamplingTensors(temp, torch.full((B,), 40 if masks else 0, dtype=torch.int32, device=DEV),
                        torch.full((B,), 0.9 if masks else 1.0, device=DEV),
                        torch.full((B,), 0.05 if masks else 0.0, device=DEV), seeds, steps,
                        no_top_k=not masks, no_top_p=not masks, no_min_p=not masks)
    assert torch.equal(cuda.sample(logits, p), native.sample(logits, p))


def test_probe_and_gates():
    from halserve.hal.cuda import CudaBackend

    r = CudaBackend.probe()
    assert (r.score > 0) == ON_GPU and r.reason
    be = CudaBackend(DEV)
    assert be.supports("attention") is True
    assert str(be.supports("swap_blocks")).startswith("native fallback")
    be.capability = (9, 0)
    assert "10.0" in be.supports("linear", scheme="nvfp4")
    be.capability = (8, 0)
    assert str(be.supports("linear", scheme="fp8")).startswith("refused")


def test_attention_batch_invariant_decode_splits(native):
    """Batch-invariant split-KV: a decode row's keys split at fixed positions, so its output is
    bitwise the same alone, beside longer contexts (more splits in the grid) and beside a
    prefill; and it matches native."""
    from halserve.hal.cuda import CudaBackend
    from halserve.hal.triton.attention import BI_SPLIT_KEYS

    torch.manual_seed(7)
    be = CudaBackend(DEV, batch_invariant=True)
    hq, hk, d, bs = 4, 2, 32, 16
    slens = [4 * BI_SPLIT_KEYS + 22, 37, 5 * BI_SPLIT_KEYS + 10, 9]  # several splits, past a power of two
    nblocks = 4 * (max(slens) + bs - 1) // bs
    cache = torch.randn(2, nblocks, bs, hk, d, device=DEV)
    qlens = [1, 1, 1, 9]
    meta = _meta(qlens, slens, bs, nblocks, DEV)
    q = torch.randn(sum(qlens), hq, d, device=DEV)
    full = be.attention(q, cache, meta, 0.3)
    assert nmse(full, native.attention(q, cache, meta, 0.3)) < 1e-10
    for i in range(3):  # each decode row alone
        alone = AttentionMetadata(torch.tensor([0, 1], dtype=torch.int32, device=DEV), meta.seq_lens[i:i + 1],
                                  meta.block_tables[i:i + 1], meta.slot_mapping[i:i + 1], 1, slens[i], [1],
                                  [slens[i]], bs)
        assert torch.equal(be.attention(q[i:i + 1].contiguous(), cache, alone, 0.3), full[i:i + 1])
    # the graph form: lengths unknown on the host, only a bound
    bound = be.attention(q, cache, dataclasses.replace(meta, max_seqlen_k=nblocks * bs), 0.3)
    assert torch.equal(bound, full)


def _skinny_cfg(kind, fused, quant_in, splits=3):
    return dict(KIND=kind, BLOCK_N=16, BLOCK_K=32, SPLITS=splits, FUSED=fused, QUANT_IN=quant_in, num_warps=4,
                num_stages=1)


SKINNY_CFGS = {"tuned": None, "dot_two_kernels": _skinny_cfg("dot", False, False),
               "gemv_fused_quant_in": _skinny_cfg("gemv", True, True),
               "dot_fused_quant_in_1split": _skinny_cfg("dot", True, True, splits=1),
               "gemvr_fused_quant_in": _skinny_cfg("gemvr", True, True),
               "gemvr_two_kernels": _skinny_cfg("gemvr", False, False, splits=2)}


@pytest.mark.parametrize("scheme", ["none", "fp8", "fp8_per_tensor", "fp8_weight_only"])
@pytest.mark.parametrize("m", [1, 5, 16, 21])
@pytest.mark.parametrize("cfg", list(SKINNY_CFGS))
def test_skinny_matmul_matches_native(native, scheme, m, cfg):
    """The split-K weight-streaming GEMM (decode linears) against native, with odd K and N so
    every split and tile has a ragged edge, in both inner loops, with the split reduction in
    a second kernel or in the tile's last program, and W8A8 activations quantized before or
    inside the kernel."""
    from halserve.hal.triton.skinny import skinny_matmul

    torch.manual_seed(8)
    x = torch.randn(m, 100, device=DEV, dtype=torch.bfloat16)
    w = native.pack_weight((torch.randn(37, 100, device=DEV) * 0.1).bfloat16(), scheme)
    b = torch.randn(37, device=DEV, dtype=torch.bfloat16)
    got = skinny_matmul(x, w.weight, w.scale, w.act_scheme, b, cfg=SKINNY_CFGS[cfg])
    assert nmse(got, native.linear(x, w, b)) < 1e-4  # two bf16 roundings of the output


@pytest.mark.parametrize("kind", ["gemv", "gemvr", "dot"])
def test_skinny_fused_reduction_is_the_same_sum(native, kind):
    """The last-arriving program adds the splits in the same order as the reduction kernel:
    bitwise the same output, call after call (its arrival counters re-arm themselves)."""
    from halserve.hal.triton.skinny import skinny_matmul

    torch.manual_seed(10)
    x = torch.randn(3, 200, device=DEV, dtype=torch.bfloat16)
    w = native.pack_weight((torch.randn(45, 200, device=DEV) * 0.1).bfloat16(), "fp8")
    two = skinny_matmul(x, w.weight, w.scale, "per_token", cfg=_skinny_cfg(kind, False, True, splits=4))
    for _ in range(2):
        one = skinny_matmul(x, w.weight, w.scale, "per_token", cfg=_skinny_cfg(kind, True, True, splits=4))
        assert torch.equal(one, two)


def test_skinny_matmul_rows_never_mix():
    from halserve.hal.triton.skinny import skinny_matmul

    torch.manual_seed(9)
    x = torch.randn(40, 96, device=DEV)
    w = torch.randn(33, 96, device=DEV)
    cfg = _skinny_cfg("dot", True, False)  # one config for every M (the tuned one may switch loops)
    full = skinny_matmul(x, w, cfg=cfg)
    for i in (0, 15, 16, 39):
        assert torch.equal(skinny_matmul(x[i:i + 1].contiguous(), w, cfg=cfg), full[i:i + 1])


def test_write_kv_skips_slots_past_the_cache(cuda):
    """GPU backends raise nothing for a slot past the cache (a check would cost a device sync)
    but never write out of bounds: a K row at a slot past the end would land in the V half, a V
    row past the tensor. The cache is the first two planes of a buffer of three, so a stray
    write shows in the third. Both kernels that write the cache."""
    hk, d, bs, nb, good = 2, 24, 4, 3, 7
    key, val = torch.randn(3, hk, d, device=DEV), torch.randn(3, hk, d, device=DEV)
    slots = torch.tensor([nb * bs, nb * bs + 5, good], device=DEV)  # two past the end, one good
    cs = build_rope_cache(d, d, 64, 10000.0, None).to(DEV)
    for fused in (False, True):
        buf = torch.randn(3, nb, bs, hk, d, device=DEV)
        before = buf.clone()
        k = key.clone()
        if fused:
            q = torch.randn(3, 4, d, device=DEV)
            cuda.rotary_write_kv(torch.tensor([1, 2, 3], device=DEV), q, k, val, cs, True, buf[:2], slots)
        else:
            cuda.write_kv(k, val, buf[:2], slots)
        want = before.clone()
        want[0].view(-1, hk, d)[good], want[1].view(-1, hk, d)[good] = k[2], val[2]
        assert torch.equal(buf, want), f"fused={fused}"
