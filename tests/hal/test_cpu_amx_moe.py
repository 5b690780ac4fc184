"""cpu_amx's fused MoE kernel (moe.c, hs_moe) on every ISA tier the CPU here runs, against a
float64 reference of the same math: T = 1..8 tokens, top-k 1..8, experts shared by tokens
and repeated within one, float32 / bfloat16 / int8 weights, shapes with every vector tail;
a token's output bit for bit the same alone or in any batch (batch-invariant mode sends
every batch size through the kernel); a bad expert id is an error, not a wild read."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from halserve.hal.interface import MoeSpec
from tests.hal.test_cpu_amx import RUNNABLE, backend, nmse

H, I, E = 88, 42, 8  # 88 and 42: a tail after every vector width and row block the kernel uses
# float32 means float32 (conformance's moe limit); bf16 rounds gate/up, the activation and
# each expert's output as native does (conformance allows 3e-4; these land near 1.5e-5)
LIMIT = {torch.float32: 1e-9, torch.bfloat16: 3e-4}


def weights(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    return w13, w2


def dense(pw) -> torch.Tensor:
    """The float64 weight a packed expert stack stands for (int8: q x its row scale)."""
    w = pw.weight.double()
    return w * pw.scale.double()[..., None] if pw.scheme == "int8" else w


def reference(x, tw, ids, w13, w2) -> torch.Tensor:
    """Every (token, slot) pair's expert in float64, weighted and summed per token."""
    a13, a2 = dense(w13), dense(w2)
    xd = x.double()
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gu = a13[e] @ xd[t]
            out[t] += float(tw[t, k]) * (a2[e] @ (F.silu(gu[:I]) * gu[I:]))
    return out


def call(b, x, tw, ids, w13, w2):
    kind = b._moe_kind(w13, w2, x.dtype)
    assert kind is not None
    return b._moe_small(x, tw, ids, w13, w2, kind, None)


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("scheme,dtype", [("none", torch.float32), ("none", torch.bfloat16),
                                          ("int8", torch.float32), ("int8", torch.bfloat16)])
def test_every_batch_and_top_k_matches_float64(tier, scheme, dtype):
    b = backend(tier)
    w13, w2 = (b.pack_weight(w, scheme) for w in weights(dtype))
    g = torch.Generator().manual_seed(1)
    worst = []
    # every T and every top-k, each twice, in 16 calls (not all 64 pairs: CI time)
    for t, k in [(t, k) for t in range(1, 9) for k in (t, 9 - t)]:
        x = torch.randn(t, H, generator=g).to(dtype)
        # a token's k distinct experts (what routing gives), random weights
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)])
        tw = torch.rand(t, k, generator=g)
        worst.append((nmse(call(b, x, tw, ids, w13, w2), reference(x, tw, ids, w13, w2)), t, k))
    assert max(worst)[0] < LIMIT[dtype], max(worst)


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_and_repeated_experts(tier, dtype):
    """Eight tokens on one expert (two chunks of the kernel's four), a token naming an expert
    twice (both slots count), and a mix."""
    b = backend(tier)
    w13, w2 = (b.pack_weight(w) for w in weights(dtype, 2))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, H, generator=g).to(dtype)
    tw = torch.rand(8, 3, generator=g)
    for ids in (torch.full((8, 3), 5), torch.tensor([[1, 1, 6]] * 8),
                torch.randint(0, 3, (8, 3), generator=g)):
        got = call(b, x, tw, ids, w13, w2)
        assert nmse(got, reference(x, tw, ids, w13, w2)) < LIMIT[dtype], ids


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tokens_output_does_not_depend_on_its_batch(tier, dtype):
    """Bitwise: each token alone equals its row in batches of 8 and (batch-invariant mode,
    which sends every size through the kernel) 40."""
    b = backend(tier, batch_invariant=True)
    w13, w2 = (b.pack_weight(w) for w in weights(dtype, 4))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, H, generator=g).to(dtype)
    logits = torch.randn(40, E, generator=g)
    spec = MoeSpec(top_k=3)
    whole = b.moe(x, logits, w13, w2, spec)
    eight = b.moe(x[:8], logits[:8], w13, w2, spec)
    assert torch.equal(eight, whole[:8])
    for t in (0, 7, 39):
        assert torch.equal(b.moe(x[t:t + 1], logits[t:t + 1], w13, w2, spec), whole[t:t + 1]), t


def test_an_expert_id_outside_the_weights_is_an_error():
    b = backend(RUNNABLE[0])
    w13, w2 = (b.pack_weight(w) for w in weights(torch.float32))
    x = torch.randn(2, H)
    with pytest.raises(IndexError, match=f"expert id {E} is outside the {E} experts"):
        call(b, x, torch.ones(2, 1), torch.tensor([[1], [E]]), w13, w2)
