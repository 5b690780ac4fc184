"""Regressions found in review: cpu_amx's C sampler on rows native handles by its own rules."""
from __future__ import annotations

import pytest
import torch

from halserve.hal.conformance import sampling_tensors
from halserve.hal.native import NativeBackend
from tests.hal.test_cpu_amx import RUNNABLE, backend

pytestmark = pytest.mark.skipif(not RUNNABLE, reason="cpu_amx needs an x86-64 CPU with AVX2 and FMA")


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("v", [17, 4096, 70001])  # a scalar tail, whole vectors, batch-1 chunks
def test_min_p_with_a_positive_infinite_logit_draws_what_native_draws(tier, v):
    """An overflowed (+inf) logit makes native's softmax NaN, so min-p drops nothing and the
    first +inf token wins the draw; the C min-p pass used to drop every token and return 0."""
    be, nat = backend(tier), NativeBackend()
    lg = torch.randn(2, v, generator=torch.Generator().manual_seed(v))
    lg[0, 5] = float("inf")
    lg[1, 9] = lg[1, v - 1] = float("inf")
    for b in (1, 2):
        for s in range(3):
            p = sampling_tensors(b, 0.9, min_p=0.5, seeds=torch.arange(b) + s, steps=torch.arange(b))
            got, want = be.sample(lg[:b], p), nat.sample(lg[:b], p)
            assert torch.equal(got, want), (b, s, got, want)
            assert int(got[0]) == 5
