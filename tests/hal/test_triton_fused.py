"""The fused rotary + write_kv Triton kernel against the two ops it replaces: the cuda
backend's own rotary and write_kv kernels, and native's torch ops. In the interpreter bit for
bit (the same arithmetic, no FMA); on a GPU, where the compiler may contract the rotation into
FMAs differently per kernel, q and k to within rounding and the cache bit-exactly what
write_kv makes of the k the kernel left. GPU or interpreter (tests/helpers/triton_here)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.triton_here import DEV, ON_GPU  # noqa: E402 (first: it sets the interpreter up)

from halserve.hal.native import NativeBackend, build_rope_cache  # noqa: E402
from halserve.hal.quant import FP8_DTYPE  # noqa: E402


@pytest.fixture(scope="module")
def cuda():
    from halserve.hal.cuda import CudaBackend

    return CudaBackend(DEV)


def _inputs(dtype, t, hq, hk, d, rot, strided, kv_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype).to(DEV)
    if strided:  # views of one qkv row, as a kernel may be handed them
        q, k, v = (qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d),
                   qkv[:, (hq + hk) * d:].view(t, hk, d))
    else:
        q, k, v = (qkv[:, :hq * d].reshape(t, hq, d).contiguous(),
                   qkv[:, hq * d:(hq + hk) * d].reshape(t, hk, d).contiguous(),
                   qkv[:, (hq + hk) * d:].reshape(t, hk, d).contiguous())
    pos = torch.randint(0, 4096, (t,), generator=g).to(DEV)
    cs = build_rope_cache(d, rot, 4096, 10000.0, None).to(DEV)
    bs, nblocks = 16, 2 * t // 16 + 2
    slots = torch.randperm(nblocks * bs, generator=g)[:t]
    slots[::3] = -1
    cache = torch.randn(2, nblocks, bs, hk, d, generator=g).to(kv_dtype or dtype).to(DEV)
    return qkv, q, k, v, pos, cs, cache, slots.to(DEV)


def _bits(t):
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _nmse(a, b) -> float:
    a, b = a.double(), b.double()
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


CASES = [  # dtype, T, Hq, Hk, D, rot, neox, strided, fp8 cache[, Qwen3's q/k norm]
    (torch.float32, 5, 4, 2, 64, 64, True, False, False),
    (torch.float32, 5, 4, 2, 64, 32, False, True, False, True),
    (torch.bfloat16, 4, 8, 2, 128, 128, True, False, False, True),
    (torch.float16, 3, 40, 8, 128, 128, True, False, True, True),
    (torch.float32, 5, 4, 2, 64, 32, False, True, False),
    (torch.float16, 3, 40, 8, 128, 128, True, False, False),  # 40 heads: the head loop and its mask
    (torch.bfloat16, 4, 8, 2, 96, 48, True, False, False),  # interpreter: the kernel's own rounding
    (torch.bfloat16, 4, 8, 2, 96, 96, False, True, False),
    (torch.bfloat16, 6, 4, 4, 64, 64, True, False, True),
    (torch.float32, 6, 4, 1, 64, 32, False, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
@pytest.mark.parametrize("peer", ["cuda", "native"])
def test_fused_equals_rotary_then_write_kv(cuda, case, peer):
    dtype, t, hq, hk, d, rot, neox, strided, fp8, *qk = case
    if fp8 and FP8_DTYPE is None:
        pytest.skip("this torch has no float8_e4m3fn")
    kv_dtype = FP8_DTYPE if fp8 else None
    scales = {"k_scale": 0.37, "v_scale": 2.5} if fp8 else {}
    qkv_a, qa, ka, va, pos, cs, cache_a, slots = _inputs(dtype, t, hq, hk, d, rot, strided, kv_dtype)
    qkv_b, qb, kb, vb, _, _, cache_b, _ = _inputs(dtype, t, hq, hk, d, rot, strided, kv_dtype)
    cache_before = cache_a.clone()
    norm = {}
    if qk:
        g = torch.Generator().manual_seed(1)
        qw, kw = (torch.randn(d, generator=g).add(1.0).to(dtype).to(DEV) for _ in range(2))
        norm = dict(q_norm_weight=qw, k_norm_weight=kw, norm_eps=1e-5)
    cuda.rotary_write_kv(pos, qa, ka, va, cs, neox, cache_a, slots, **scales, **norm)
    two = cuda if peer == "cuda" else NativeBackend(DEV)
    if qk:  # what the model ran before: rms_norm of each head row into new tensors
        qb = two.rms_norm(qb.reshape(-1, d), qw, 1e-5).view(qb.shape)
        kb = two.rms_norm(kb.reshape(-1, d), kw, 1e-5).view(kb.shape)
    two.rotary(pos, qb, kb, cs, neox)
    two.write_kv(kb, vb, cache_b, slots, **scales)
    assert torch.equal(_bits(va), _bits(vb))
    # native's rms_norm is torch's fused one on the CPU (its own rsqrt): the norm cases match it
    # to rounding; everything else, and the cuda peer always, bit for bit in the interpreter
    if ON_GPU or (qk and peer == "native"):
        limit = 1e-12 if dtype == torch.float32 else 1e-5
        for a, b in ((qa, qb), (ka, kb)):
            assert _nmse(a, b) < limit
        want = cache_before.clone()
        NativeBackend(DEV).write_kv(ka, va, want, slots, **scales)
        assert torch.equal(_bits(cache_a), _bits(want))
    else:
        assert torch.equal(_bits(qa), _bits(qb)) and torch.equal(_bits(ka), _bits(kb))
        assert torch.equal(_bits(cache_a), _bits(cache_b))
        if strided and not qk:
            assert torch.equal(_bits(qkv_a), _bits(qkv_b))
    # the op did something: rotated q and wrote the unpadded slots
    assert not torch.equal(_bits(cache_a), _bits(cache_before))


def test_dispatch_sends_strided_caches_to_the_composite(cuda):
    spec = dict(dtype=torch.bfloat16, kv_dtype=torch.bfloat16, head_dim=64, rot_dim=64, is_neox=True,
                num_heads=4, num_kv_heads=2, block_size=16, unit_stride=True, contiguous=True)
    assert cuda.supports("rotary_write_kv", **spec, cache_contiguous=True) is True
    assert str(cuda.supports("rotary_write_kv", **spec, cache_contiguous=False)).startswith("native fallback")
