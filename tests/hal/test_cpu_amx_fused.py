"""cpu_amx's fused rotary + write_kv C call against the two calls it replaces, bit for bit:
cpu_amx's own rotary then write_kv, and native's torch ops. Batch 1 (the calling thread) and
enough tokens for the parallel region; neox and gpt-j, partial rotary, pad slots."""
from __future__ import annotations

import pytest
import torch

from halserve.hal.native import NativeBackend, build_rope_cache
from tests.hal.test_cpu_amx import RUNNABLE, backend, nmse

pytestmark = pytest.mark.skipif(not RUNNABLE, reason="cpu_amx needs an x86-64 CPU with AVX2 and FMA")


@pytest.fixture(scope="module", params=RUNNABLE or ["none"])
def amx(request):
    return backend(request.param)


def _inputs(dtype, t, hq, hk, d, rot, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype)
    parts = qkv.split([hq * d, hk * d, hk * d], dim=1)
    q, k, v = (p.view(t, -1, d) if strided else p.reshape(t, -1, d).contiguous() for p in parts)
    pos = torch.randint(0, 2048, (t,), generator=g)
    cs = build_rope_cache(d, rot, 2048, 10000.0, None)
    bs = 16
    nblocks = t // bs + 3
    slots = torch.randperm(nblocks * bs, generator=g)[:t]
    if t > 1:  # a pad slot, skipped (a decode token always writes)
        slots[t // 2] = -1
    stack = torch.randn(3, 2, nblocks, bs, hk, d, generator=g).to(dtype)  # the engine's stacked layers
    return q, k, v, pos, cs, stack, slots


CASES = [  # dtype, T, Hq, Hk, D, rot, neox, strided[, Qwen3's q/k norm]
    (torch.bfloat16, 1, 32, 4, 64, 64, True, False),  # the 1.1B decode token
    (torch.bfloat16, 1, 16, 4, 128, 128, True, False, True),  # a Qwen3 decode token
    (torch.float32, 9, 8, 2, 64, 32, False, False, True),
    (torch.bfloat16, 3, 4, 2, 64, 64, False, True, True),
    (torch.bfloat16, 9, 8, 2, 96, 48, False, False),  # 9 tokens: the parallel region
    (torch.float32, 1, 4, 4, 64, 32, True, False),
    (torch.float32, 12, 8, 1, 128, 128, False, False),
    (torch.bfloat16, 5, 8, 2, 64, 64, True, True),  # views of one qkv row: contiguous copies
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
@pytest.mark.parametrize("peer", ["cpu_amx", "native"])
def test_fused_equals_rotary_then_write_kv(amx, case, peer):
    dtype, t, hq, hk, d, rot, neox, strided, *qk = case
    qa, ka, va, pos, cs, stack_a, slots = _inputs(dtype, t, hq, hk, d, rot, strided)
    qb, kb, vb, _, _, stack_b, _ = _inputs(dtype, t, hq, hk, d, rot, strided)
    before = stack_a.clone()
    amx.native_ran.clear()
    norm = {}
    if qk:
        g = torch.Generator().manual_seed(1)
        qw, kw = (torch.randn(d, generator=g).add(1.0).to(dtype) for _ in range(2))
        norm = dict(q_norm_weight=qw, k_norm_weight=kw, norm_eps=1e-5)
    amx.rotary_write_kv(pos, qa, ka, va, cs, neox, stack_a[1], slots, **norm)
    assert amx.native_ran["rotary_write_kv"] == 0  # the C call ran, not the composite
    two = amx if peer == "cpu_amx" else NativeBackend()
    if qk:  # what the model ran before: rms_norm of each head row into new tensors
        qb = two.rms_norm(qb.reshape(-1, d), qw, 1e-5).view(qb.shape)
        kb = two.rms_norm(kb.reshape(-1, d), kw, 1e-5).view(kb.shape)
    two.rotary(pos, qb, kb, cs, neox)
    two.write_kv(kb, vb, stack_b[1], slots)
    if peer == "native" and (dtype == torch.float32 or qk):
        # gcc contracts the C rotation into FMAs (so does cpu_amx's rotary), and native's
        # rms_norm is torch's (its own rsqrt): last bits differ
        for a, b in ((qa, qb), (ka, kb), (stack_a, stack_b)):
            assert nmse(a, b) < (1e-13 if dtype == torch.float32 else 1e-5)
    else:
        assert torch.equal(qa, qb) and torch.equal(ka, kb) and torch.equal(stack_a, stack_b)
    assert torch.equal(va, vb)
    assert torch.equal(stack_a[0], before[0]) and torch.equal(stack_a[2], before[2])  # other layers
    assert not torch.equal(stack_a[1], before[1])


def test_supports_sends_other_caches_to_the_composite(amx):
    spec = dict(head_dim=64, rot_dim=64, is_neox=True, num_heads=4, num_kv_heads=2, block_size=16)
    assert amx.supports("rotary_write_kv", dtype=torch.bfloat16, kv_dtype=torch.bfloat16, **spec) is True
    assert str(amx.supports("rotary_write_kv", dtype=torch.bfloat16, kv_dtype=torch.float32,
                                **spec)).startswith("native fallback")
    assert str(amx.supports("rotary_write_kv", dtype=torch.float16, kv_dtype=torch.float16,
                                **spec)).startswith("native fallback")


def test_norm_weights_of_the_wrong_size_are_refused_by_name(amx):
    """The C kernel reads head_dim values of each norm weight: a shorter one was read past its
    end (a longer one silently cut); now a one-line error naming it, nothing written."""
    q, k, v, pos, cs, stack, slots = _inputs(torch.float32, 3, 4, 2, 64, 64, False)
    cache, q0 = stack[0].clone(), q.clone()
    for qn, kn, bad in ((32, 64, "q_norm_weight has 32"), (64, 65, "k_norm_weight has 65")):
        with pytest.raises(ValueError, match=f"rotary_write_kv: {bad} values; the head size is 64"):
            amx.rotary_write_kv(pos, q, k, v, cs, False, stack[0], slots, q_norm_weight=torch.ones(qn),
                                k_norm_weight=torch.ones(kn))
    assert torch.equal(stack[0], cache) and torch.equal(q, q0)
