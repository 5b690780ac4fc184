"""cpu_amx's C sampler (sample.c) against native's torch sampler: the same token for the same
seeds on every tier, with every SamplingTensors field varied on its own, greedy ties and NaN
as torch.argmax takes them, batch-1 vocabulary chunks against whole rows; and the small-op
changes of the same pass (silu_and_mul split or not, the same bits)."""
from __future__ import annotations

import pytest
import torch

from halserve.hal.conformance import sampling_tensors
from halserve.hal.interface import SamplingTensors
from halserve.hal.native import NativeBackend
from tests.hal.test_cpu_amx import RUNNABLE, backend

pytestmark = pytest.mark.skipif(not RUNNABLE, reason="cpu_amx needs an x86-64 CPU with AVX2 and FMA")

NAT = NativeBackend()
FIELDS = ("temperature", "top_k", "top_p", "min_p", "seeds", "steps")


def _logits(b: int, v: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lg = torch.randn(b, v, generator=g) * 3
    lg[:, 3::11] = float("-inf")  # masked tokens (a logit bias of -inf) are never drawn
    return lg


def _agree(be, lg: torch.Tensor, p: SamplingTensors, draws: int = 6) -> None:
    """Token-exact agreement with native over ``draws`` steps of the same seeds."""
    for s in range(draws):
        q = SamplingTensors(p.temperature, p.top_k, p.top_p, p.min_p, p.seeds, p.steps + s, p.all_greedy,
                            p.all_random, p.no_top_k, p.no_top_p, p.no_min_p)
        got, want = be.sample(lg, q), NAT.sample(lg, q)
        assert torch.equal(got, want), (s, got, want)


# each row of a batch of 16 differs from the baseline in one field only
VARIED = {
    "temperature": dict(temperature=torch.linspace(0.3, 1.8, 16)),
    "top_k": dict(top_k=torch.tensor([0, 1, 2, 5, 40, 100, 4999, 5003] * 2, dtype=torch.int32)),
    "top_p": dict(top_p=torch.linspace(0.05, 1.0, 16)),
    "min_p": dict(min_p=torch.linspace(0.0, 0.5, 16)),
    "seeds": dict(seeds=torch.arange(16) * 977 - 3000),  # negative seeds too: their upper 32 bits count
    "steps": dict(steps=torch.arange(16) * 3 + (1 << 33)),
    "combined": dict(temperature=torch.linspace(0.5, 1.5, 16), top_k=torch.tensor([0, 20] * 8),
                     top_p=torch.tensor([1.0, 0.8, 0.6, 0.95] * 4), min_p=torch.tensor([0.0, 0.02, 0.1, 0.0] * 4)),
    "mixed greedy": dict(temperature=torch.tensor([0.0, 0.9] * 8), top_k=torch.tensor([0, 5] * 8)),
}


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("field", list(VARIED))
def test_seeded_draws_match_native_with_each_field_varied(tier, field):
    be = backend(tier)
    base = dict(temperature=0.9, seeds=torch.arange(16) + 5, steps=torch.arange(16))
    p = sampling_tensors(16, **{**base, **VARIED[field]})
    _agree(be, _logits(16, 5003), p)


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("kind", ["plain", "top_k", "top_p", "min_p", "all"])
def test_batch_one_large_vocabulary_matches_native(tier, kind):
    """Batch 1 is the decode case: the unfiltered draw splits the vocabulary over the pool
    (vectorized), the filtered ones select candidates without sorting the row."""
    be = backend(tier)
    kw = {"plain": {}, "top_k": dict(top_k=50), "top_p": dict(top_p=0.9), "min_p": dict(min_p=0.05),
          "all": dict(top_k=64, top_p=0.7, min_p=0.02)}[kind]
    p = sampling_tensors(1, 0.8, seeds=torch.tensor([42]), steps=torch.tensor([7]), **kw)
    _agree(be, _logits(1, 70000, seed=1), p, draws=4)


@pytest.mark.parametrize("tier", RUNNABLE)
def test_hints_are_followed_as_native_follows_them(tier):
    """The host hints win over the tensors (they must agree; when they do not, both
    backends still draw the same tokens): no_top_k with top_k set, all_greedy with a
    temperature, all_random with a zero temperature."""
    be = backend(tier)
    lg = _logits(8, 997, seed=2)
    p = sampling_tensors(8, torch.tensor([0.0, 0.7] * 4), top_k=3, top_p=0.5, min_p=0.2,
                         seeds=torch.arange(8), steps=torch.arange(8))
    for hint in ("no_top_k", "no_top_p", "no_min_p", "all_greedy", "all_random"):
        q = SamplingTensors(*(getattr(p, f) for f in FIELDS), **{
            "all_greedy": hint == "all_greedy", "all_random": hint == "all_random",
            "no_top_k": hint == "no_top_k", "no_top_p": hint == "no_top_p", "no_min_p": hint == "no_min_p"})
        _agree(be, lg, q, draws=4)


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("v", [37, 5003, 300_000])
def test_greedy_takes_the_first_of_tied_maxima_and_nan_first(tier, v):
    """torch.argmax's rule: the first index of the maximum, and a NaN counts as the
    maximum. 300k tokens at batch 1 split the argmax over the pool: the tie crosses chunks."""
    be = backend(tier)
    lg = _logits(4, v, seed=3)
    top = float(lg.max()) + 1
    for j in (v - 1, v // 2 + 1, v // 3):  # three tied maxima, the first at v // 3
        lg[0, j] = top
    lg[1] = float("-inf")  # all masked: index 0, as torch
    lg[2, v - 2] = float("nan")  # in the row's last, partial vector
    lg[2, 1] = top
    lg[3, v - 2] = float("nan")
    lg[3, v // 4] = float("nan")
    p = sampling_tensors(1, 0.0)
    for r in range(4):
        got = be.sample(lg[r:r + 1].contiguous(), p)
        assert int(got) == int(lg[r:r + 1].argmax(-1)), r
    assert torch.equal(be.sample(lg, sampling_tensors(4, 0.0)), lg.argmax(-1))


@pytest.mark.parametrize("tier", RUNNABLE)
def test_a_row_draws_the_same_alone_and_in_a_batch(tier):
    """At batch 1 a 70k vocabulary is drawn in chunks over the pool; in a batch each row is
    drawn whole by one thread: the same token either way (a token's noise depends on its
    column only)."""
    be = backend(tier)
    lg = _logits(4, 70000, seed=4)
    p = sampling_tensors(4, 1.1, min_p=torch.tensor([0.0, 0.01, 0.0, 0.3]), seeds=torch.arange(4) * 5,
                         steps=torch.arange(4))
    batch = be.sample(lg, p)
    for r in range(4):
        one = SamplingTensors(*(getattr(p, f)[r:r + 1] for f in FIELDS), False, True, True, True, False)
        assert int(be.sample(lg[r:r + 1], one)) == int(batch[r]), r


@pytest.mark.parametrize("tier", RUNNABLE)
def test_bfloat16_logits_and_out(tier):
    be = backend(tier)
    lg = _logits(6, 4099, seed=5).bfloat16()
    p = sampling_tensors(6, torch.tensor([0.0, 0.8, 1.2] * 2), top_k=torch.tensor([0, 0, 9] * 2),
                         seeds=torch.arange(6), steps=torch.arange(6))
    _agree(be, lg, p, draws=4)
    out = torch.full((6,), -1, dtype=torch.int64)
    assert be.sample(lg, p, out=out) is out and torch.equal(out, NAT.sample(lg, p))


def test_supports_says_what_the_sampler_takes():
    be = backend(RUNNABLE[0])
    assert be.supports("sample", dtype=torch.float32) is True
    assert be.supports("sample", dtype="bfloat16") is True
    assert be.supports("sample", dtype=torch.float16).startswith("native fallback")
    assert "sample" in type(be).kernel_ops


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_rows_alone_and_split_over_the_pool_agree_bitwise(tier, dtype):
    """A decode row (under the split threshold) runs on the calling thread; 16 rows of the
    same intermediate size split over the pool: each row's bits must not change."""
    be = backend(tier)
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(16, 2 * 5635, generator=g) * 4).to(dtype)
    many = be.silu_and_mul(x)
    for r in (0, 7, 15):
        assert torch.equal(be.silu_and_mul(x[r:r + 1]), many[r:r + 1]), r
    ref = torch.nn.functional.silu(x[:, :5635].double()) * x[:, 5635:].double()
    err = float(((many.double() - ref) ** 2).sum() / (ref ** 2).sum())
    assert err < (1e-12 if dtype == torch.float32 else 1e-4)
