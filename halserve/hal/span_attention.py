"""Batch-invariant attention in pure torch (NativeBackend's, in batch-invariant mode).

A query token's output must depend on its sequence and position only: not on the chunk it
came in (how many tokens, where the chunk starts), nor on whether it came as a decode row.
The engine computes the same token in different ways depending on the other requests: a
preempted request is recomputed as a prefill, and the shared token budget decides where
prefill chunks end. ``F.scaled_dot_product_attention`` does not give that (its kernels and
reduction orders change with the query and key lengths), so here:

- query rows (token x query head of one KV head) go in blocks of ``ROWS`` and keys in spans
  of ``SPAN_KEYS`` through GEMMs of one fixed shape each: CPU BLAS picks its kernel by shape,
  and within one shape a row's result is the same at any place in its block;
- each span is a softmax of its own (max, exp, and the sum of p from the P @ [V | 1] GEMM);
  the spans are weighed by the row's overall max (exact: a max has no order) and added in
  span order by a cumulative sum (sequential by definition);
- a span or key outside a row's keys (causal limit, window, padding) leaves that row exactly
  as it was (p = 0, weight 0, and adding 0 is exact), so spans no row of a group of blocks
  can see are skipped and the keys past a chunk's end do not matter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS = 16  # query rows per GEMM block (NativeBackend's batch-invariant GEMM uses 16 too)
SPAN_KEYS = 64  # keys per span
GROUP_ELEMS = 1 << 23  # scores computed at once (32 MiB of float32)


def attend_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                 scale: float) -> torch.Tensor:
    """q [qlen, hq, d] are the last qlen positions of a context whose keys and values are
    k, v [hk, slen, d] (float32) -> [qlen, hq, d] float32."""
    qlen, hq, d = q.shape
    hk, slen = k.shape[0], k.shape[1]
    group = hq // hk
    nsp = -(-slen // SPAN_KEYS)
    pad = nsp * SPAN_KEYS - slen
    k = F.pad(k, (0, 0, 0, pad)).view(hk, nsp, SPAN_KEYS, d).transpose(-1, -2).contiguous()  # [.., d, S]
    v = F.pad(torch.cat([v, v.new_ones(hk, slen, 1)], -1), (0, 0, 0, pad)).view(hk, nsp, SPAN_KEYS, d + 1)
    rows = qlen * group
    nrb = -(-rows // ROWS)
    qg = (q.float() * scale).view(qlen, hk, group, d).permute(1, 0, 2, 3).reshape(hk, rows, d)
    qg = F.pad(qg, (0, 0, 0, nrb * ROWS - rows)).view(hk, nrb, ROWS, d)
    # each row's position (padding rows: past the chunk; their keys stop at slen, outputs dropped)
    ctx = slen - qlen
    pos = (ctx + torch.arange(nrb * ROWS, device=q.device) // group).view(nrb, ROWS)
    kpos = torch.arange(nsp * SPAN_KEYS, device=q.device).view(nsp, SPAN_KEYS)
    out = torch.empty(hk, nrb, ROWS, d, device=q.device)
    neg = float("-inf")
    # row blocks at a time: about one span of positions (few spans of a group's are masked for
    # all its rows in a causal prefill), within bounded memory
    step = max(1, min(-(-SPAN_KEYS * group // ROWS), GROUP_ELEMS // (hk * ROWS * nsp * SPAN_KEYS)))
    for b0 in range(0, nrb, step):
        b1 = min(b0 + step, nrb)
        # the spans some row of blocks b0..b1 sees (positions rise with the block)
        j1 = min(nsp, (ctx + (b1 * ROWS - 1) // group) // SPAN_KEYS + 1)
        j0 = 0 if window is None else min(j1 - 1, max(0, ctx + b0 * ROWS // group - window + 1) // SPAN_KEYS)
        p_at = pos[b0:b1, None, :, None]
        kp = kpos[j0:j1, None, :]
        ok = (kp <= p_at) & (kp < slen)
        if window is not None:
            ok = ok & (kp > p_at - window)
        # [hk, blocks, spans, ROWS, SPAN_KEYS]: one [ROWS, d] @ [d, SPAN_KEYS] GEMM each
        sc = torch.matmul(qg[:, b0:b1, None], k[:, None, j0:j1]).masked_fill(~ok, neg)
        m = sc.amax(-1)
        p = torch.exp(sc - torch.where(m == neg, 0.0, m)[..., None])
        pv = torch.matmul(p, v[:, None, j0:j1])  # [.., d + 1]: p @ V and the sum of p
        top = m.amax(2, keepdim=True)
        w = torch.exp(m - torch.where(top == neg, 0.0, top))
        tot = (pv * w[..., None]).cumsum(2)[:, :, -1]
        out[:, b0:b1] = tot[..., :d] / torch.where(tot[..., d] == 0.0, 1.0, tot[..., d])[..., None]
    return out.view(hk, nrb * ROWS, d)[:, :rows].view(hk, qlen, group, d).permute(1, 0, 2, 3).reshape(qlen, hq, d)
