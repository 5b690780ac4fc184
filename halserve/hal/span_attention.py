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
- each span is a softmax of its own (max, exp, and the sum of p from the P @ [V | 1] GEMM),
  and the spans are merged one at a time, in order, by elementwise operations;
- a span or key outside a row's keys (causal limit, window, padding) leaves that row exactly
  as it was (p = 0, and a merge with an empty span is exact), so spans no row of a block can
  see are skipped and the keys past a chunk's end do not matter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS = 16  # query rows per GEMM block (NativeBackend's batch-invariant GEMM uses 16 too)
SPAN_KEYS = 64  # keys per span


def attend_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                 scale: float) -> torch.Tensor:
    """q [qlen, hq, d] are the last qlen positions of a context whose keys and values are
    k, v [hk, slen, d] (float32) -> [qlen, hq, d] float32."""
    qlen, hq, d = q.shape
    hk, slen = k.shape[0], k.shape[1]
    group = hq // hk
    nsp = -(-slen // SPAN_KEYS)
    pad = nsp * SPAN_KEYS - slen
    k = F.pad(k, (0, 0, 0, pad)).view(hk, nsp, SPAN_KEYS, d)
    v = F.pad(torch.cat([v, v.new_ones(hk, slen, 1)], -1), (0, 0, 0, pad)).view(hk, nsp, SPAN_KEYS, d + 1)
    rows = qlen * group
    nrb = -(-rows // ROWS)
    qg = (q.float() * scale).view(qlen, hk, group, d).permute(1, 0, 2, 3).reshape(hk, rows, d)
    qg = F.pad(qg, (0, 0, 0, nrb * ROWS - rows)).view(hk, nrb, ROWS, d)
    # each row's position (padding rows: past the chunk; their keys stop at slen, outputs dropped)
    ctx = slen - qlen
    pos = (ctx + torch.arange(nrb * ROWS, device=q.device) // group).view(nrb, ROWS)
    first = [ctx + b * ROWS // group for b in range(nrb)]  # rising with the block
    last = [ctx + (b * ROWS + ROWS - 1) // group for b in range(nrb)]
    neg = float("-inf")
    m_run = torch.full((hk, nrb, ROWS), neg, device=q.device)
    l_run = torch.zeros(hk, nrb, ROWS, device=q.device)
    acc = torch.zeros(hk, nrb, ROWS, d, device=q.device)
    for j in range(nsp):
        lo, hi = j * SPAN_KEYS, (j + 1) * SPAN_KEYS
        b1 = nrb  # blocks that see a key of this span: a contiguous range [b0, b1)
        b0 = next((b for b in range(nrb) if last[b] >= lo), nrb)
        if window is not None:
            b1 = next((b for b in range(nrb) if first[b] - window + 1 >= hi), nrb)
        if b0 >= b1:
            continue
        kpos = torch.arange(lo, hi, device=q.device)
        p_at = pos[b0:b1, :, None]
        ok = (kpos <= p_at) & (kpos < slen)
        if window is not None:
            ok = ok & (kpos > p_at - window)
        s = torch.matmul(qg[:, b0:b1], k[:, j, None].transpose(-1, -2)).masked_fill(~ok, neg)
        m = s.amax(-1)
        p = torch.exp(s - torch.where(m == neg, 0.0, m)[..., None])
        pv = torch.matmul(p, v[:, j, None])  # [.., d + 1]: p @ V and the sum of p
        mr = m_run[:, b0:b1]
        m_new = torch.maximum(mr, m)
        m_safe = torch.where(m_new == neg, 0.0, m_new)
        wa, wb = torch.exp(mr - m_safe), torch.exp(m - m_safe)
        l_run[:, b0:b1] = l_run[:, b0:b1] * wa + pv[..., d] * wb
        acc[:, b0:b1] = acc[:, b0:b1] * wa[..., None] + pv[..., :d] * wb[..., None]
        m_run[:, b0:b1] = m_new
    out = acc / torch.where(l_run == 0.0, 1.0, l_run)[..., None]
    return out.view(hk, nrb * ROWS, d)[:, :rows].view(hk, qlen, group, d).permute(1, 0, 2, 3).reshape(qlen, hq, d)
