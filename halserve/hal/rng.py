"""Counter-based random numbers: the per-row seeded rule every backend's sampler follows.

A draw is a pure function of (seed, step, column), never of the batch, so a seeded
request samples the same tokens on every backend and in every batch."""
from __future__ import annotations

import torch


M32 = 0xFFFFFFFF


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x < 2^32 using 16-bit halves of c: every product < 2^48, so
    # int64 never overflows on any device.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mixer (xorshift-multiply, 'lowbias32' constants) on int64 lanes."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms [B, n] float32 in (0, 1), a pure function of (seeds[b], steps[b], column).

    This exact bit recipe is shared with the Triton sampler (``hal/triton/sample.py``), so
    seeded draws agree across backends: change both together or neither."""
    seeds, steps = seeds.to(torch.int64), steps.to(torch.int64)
    h = mix32((seeds & M32) ^ 0x9E3779B9)
    h = mix32(h ^ ((seeds >> 32) & M32))
    h = mix32(h ^ (steps & M32) ^ 0x85EBCA6B)
    h = mix32(h ^ ((steps >> 32) & M32))
    col = torch.arange(n, device=seeds.device, dtype=torch.int64)
    x = mix32(h[:, None] ^ mix32(col ^ 0x27D4EB2F)[None, :])
    x = mix32(x ^ h[:, None])
    # 23 random bits -> odd multiples of 2^-24: exactly representable, never 0 or 1.
    return ((x >> 9) * 2 + 1).to(torch.float32) * (1.0 / (1 << 24))


# the old private names, for callers written against native.py
