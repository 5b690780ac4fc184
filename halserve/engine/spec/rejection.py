"""The acceptance rule that keeps speculative output exactly the target model's.

Every proposer here drafts deterministically (n-gram, a user callable, a draft model's or a
draft head's argmax), so the speculative-sampling rule (Leviathan et al. 2023; Chen et al.
2023) meets a one-hot draft distribution q = e_x: accept x with probability
min(1, p(x)/q(x)) = p(x), else draw from norm(max(p - q, 0)) = p without x. Drawing y ~ p
with the position's own noise and accepting x iff y == x does exactly that, and since the
noise is the sampler's counter-based draw keyed by (seed, output position), a seeded request
samples the very tokens it samples without speculation (greedy included: y is the argmax).

A proposer that drafted by sampling from its own distribution would need the general rule
(the acceptance uniform and the residual draw keyed by (seed, position) as well); none does,
so only this one path exists.
"""
from __future__ import annotations


def accept_deterministic(draft: list[int], sampled: list[int]) -> list[int]:
    """``sampled[j]`` is the target's draw at draft position j (len(draft) + 1 of them, the
    last after the whole draft): the accepted drafts, then the target's token at the first
    mismatch (or the bonus token when every draft is accepted)."""
    out = []
    for d, y in zip(draft, sampled):
        out.append(y)
        if y != d:
            return out
    out.append(sampled[len(draft)])
    return out
