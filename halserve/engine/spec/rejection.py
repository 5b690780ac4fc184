"""Acceptance rules that keep speculative output exactly the target model's.

Deterministic drafts (n-gram, a user callable, a draft model's argmax) are the
speculative-sampling rule with a one-hot draft distribution q = e_x: accept x with
probability min(1, p(x)/q(x)) = p(x), else draw from norm(max(p - q, 0)) = p without x.
Drawing y ~ p with the position's own noise and accepting x iff y == x does exactly that,
and since the noise is the sampler's counter-based draw keyed by (seed, output position),
a seeded request samples the very tokens it samples without speculation (greedy included:
y is the argmax). ``accept_deterministic`` is that rule.

``rejection_sample`` is the general rule for a draft that carries a distribution q
(Leviathan et al. 2023; Chen et al. 2023), with the same per-row seeded randomness: the
acceptance uniform and the residual draw of output position t are pure functions of
(seed, t), never of the batch.
"""
from __future__ import annotations

import torch

from halserve.hal.native import counter_uniform

# a second stream for the acceptance uniforms, apart from the token draws' stream
ACCEPT_SALT = 0x5BD1E995


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


def _gumbel_argmax(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``probs`` [B, V] (rows need not be normalised), noise keyed by
    (seed, step) as the HAL sampler's."""
    u = counter_uniform(seeds, steps, probs.shape[-1])
    return (probs.clamp_min(0).log() - torch.log(-torch.log(u))).argmax(dim=-1)


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                     num_drafts: list[int], seeds: torch.Tensor, steps: torch.Tensor) -> list[list[int]]:
    """Speculative sampling. ``target_probs`` [B, k+1, V] (position j scores the token after
    draft j-1), ``draft_probs`` [B, k, V] and ``draft_tokens`` [B, k] the draft, row b using
    its first ``num_drafts[b]``; ``steps[b]`` is the output position of row b's first new
    token. Returns each row's emitted tokens (accepted drafts + one target token)."""
    b, k1, v = target_probs.shape
    k = k1 - 1
    p = target_probs.float()
    if k > 0:
        q = draft_probs.float()
        x = draft_tokens.long()
        px = p[:, :k].gather(2, x[:, :, None]).squeeze(2)
        qx = q.gather(2, x[:, :, None]).squeeze(2)
        steps_j = steps[:, None] + torch.arange(k, device=steps.device)[None, :]
        u = counter_uniform((seeds ^ ACCEPT_SALT)[:, None].expand(b, k).reshape(-1),
                            steps_j.reshape(-1), 1).view(b, k)
        accept = (u * qx <= px).tolist()
        residual = (p[:, :k] - q).clamp_min(0)
        empty = residual.sum(-1, keepdim=True) <= 0  # p == q there: a rejection cannot happen
        residual = torch.where(empty, p[:, :k], residual)
        fixed = _gumbel_argmax(residual.reshape(b * k, v), seeds[:, None].expand(b, k).reshape(-1),
                               steps_j.reshape(-1)).view(b, k).tolist()
        xs = x.tolist()
    steps_all = steps[:, None] + torch.arange(k1, device=steps.device)[None, :]
    plain = _gumbel_argmax(p.reshape(b * k1, v), seeds[:, None].expand(b, k1).reshape(-1),
                           steps_all.reshape(-1)).view(b, k1).tolist()
    out = []
    for r in range(b):
        toks = []
        for j in range(num_drafts[r]):
            if accept[r][j]:
                toks.append(xs[r][j])
            else:
                toks.append(fixed[r][j])
                break
        else:
            toks.append(plain[r][num_drafts[r]])
        out.append(toks)
    return out
