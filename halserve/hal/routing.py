"""MoE routing every backend shares: scores, grouped top-k, renormalisation (``MoeSpec``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from halserve.hal.interface import MoeSpec


def route(router_logits: torch.Tensor, spec: MoeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing: (weights [T, k] float32, expert ids [T, k] int64). See ``MoeSpec``."""
    logits = router_logits.float()
    if spec.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif spec.scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"MoeSpec.scoring {spec.scoring!r} is not valid; use softmax or sigmoid")
    choice = scores if spec.correction_bias is None else scores + spec.correction_bias.float()
    if spec.num_expert_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, spec.num_expert_group, e // spec.num_expert_group)
        if spec.scoring == "sigmoid":
            gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            gscore = grouped.amax(dim=-1)
        best = gscore.topk(spec.topk_group, dim=-1).indices
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // spec.num_expert_group, dim=1),
                                    float("-inf"))
    ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights, ids
