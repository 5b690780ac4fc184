"""Sampling math every backend shares: the top-k / top-p / min-p mask and the seeded
Gumbel-max draw (noise from ``rng.counter_uniform``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from halserve.hal.rng import counter_uniform

if TYPE_CHECKING:
    from halserve.hal.interface import SamplingTensors


def sampling_mask(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Temperature-scaled logits [B, V] float32 with tokens outside the top-k / top-p / min-p
    set at -inf (the highest-logit token always survives)."""
    temp = params.temperature.float()
    scaled = logits / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    vocab = logits.shape[-1]
    if not (params.no_top_k and params.no_top_p):
        sorted_l, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        drop = torch.zeros_like(sorted_l, dtype=torch.bool)
        if not params.no_top_k:
            k = params.top_k.to(torch.int64)
            k = torch.where((k <= 0) | (k >= vocab), torch.full_like(k, vocab), k)
            drop |= rank >= k[:, None]
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        if not params.no_top_p:
            p = params.top_p.float()
            probs = torch.softmax(sorted_l, dim=-1)
            before = probs.cumsum(dim=-1) - probs
            drop |= (before > p[:, None]) & (p < 1.0)[:, None] & (rank > 0)
        drop = torch.zeros_like(drop).scatter_(1, order, drop)
        scaled = scaled.masked_fill(drop, float("-inf"))
    if not params.no_min_p:
        probs = torch.softmax(scaled, dim=-1)
        thresh = probs.amax(dim=-1, keepdim=True) * params.min_p.float()[:, None]
        scaled = scaled.masked_fill(probs < thresh, float("-inf"))
    return scaled


def sample_random(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Gumbel-max over the masked logits, noise from the counter-based hash."""
    masked = sampling_mask(logits, params)
    u = counter_uniform(params.seeds, params.steps, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (masked + gumbel).argmax(dim=-1)
