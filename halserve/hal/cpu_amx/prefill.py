"""Prefill attention for cpu_amx: torch's CPU flash attention on each long sequence's K/V
gathered from the paged cache.

The C kernel (attention.c) computes one query row at a time in fp32 with AVX-512 dots: right
for decode, where a row reads its keys once, but a 1024-token prefill does ~T^2 row dots per
head, and there it ran 7x slower than ``scaled_dot_product_attention`` (whose CPU flash kernel
blocks queries and keys and runs QK^T and PV as bf16 GEMMs: AMX tiles where the CPU has them).
Gathering a sequence's K/V is one ``index_select`` of its blocks, a few MB at most, which is
small beside the T^2 work it feeds.

Only sequences with at least ``LONG_Q`` query rows (fewer after a long prefix) go this way; shorter ones (decode, a few
speculative tokens) stay in the C kernel, called once per run of consecutive short sequences.
Batch-invariant mode never comes here: the C kernel's rows do not depend on how the queries
were chunked, a blocked GEMM's need not."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from halserve.hal.bounds import attention_error
from halserve.hal.interface import AttentionMetadata
from halserve.hal.native import causal_mask

LONG_Q = 32  # query rows of one sequence from which the flash kernel beats the C one...
LONG_Q_PREFIX = (16, 256)  # ...or this many rows over at least this many keys (a chunk after a prefix)
_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def _long(qlen: int, slen: int) -> bool:
    """Measured on 2 threads, 32/4 heads of 64, bf16: flash / C time at 32 rows 0.77, at 16
    rows 1.23 alone but 0.53 after 1024 keys of prefix, at 8 rows 0.88 there."""
    return qlen >= LONG_Q or (qlen >= LONG_Q_PREFIX[0] and slen >= LONG_Q_PREFIX[1])


def long_seqs(meta: AttentionMetadata) -> bool:
    return any(_long(q, s) for q, s in zip(meta.query_lens_host, meta.seq_lens_host))


def _gather(half: torch.Tensor, table: torch.Tensor, slen: int, bs: int) -> torch.Tensor:
    """[Hk, slen, D] view of one sequence's keys (or values) from half [blocks, bs, Hk, D]."""
    nblk = -(-slen // bs)
    rows = half.index_select(0, table[:nblk]).reshape(nblk * bs, *half.shape[2:])[:slen]
    return rows.transpose(0, 1)


def _mask(qlen: int, slen: int, window: int) -> "torch.Tensor | None":
    """Bottom-right causal (query i sits at position slen - qlen + i) with an optional sliding
    window; None when plain top-left causal says the same (no cached prefix, no window cut)."""
    if qlen == slen and not (window and window < slen):
        return None
    return causal_mask(qlen, slen, window)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: "torch.Tensor | None",
           scale: float) -> torch.Tensor:
    """q [qlen, Hq, D], k/v [Hk, slen, D] -> [qlen, Hq, D]."""
    qh = q.transpose(0, 1)[None]
    kh, vh = k[None], v[None]
    group = q.shape[1] // k.shape[0]
    kw = {}
    if group > 1:
        if _GQA:
            kw["enable_gqa"] = True
        else:
            kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale, **kw)
    return o[0].transpose(0, 1)


def _check(meta: AttentionMetadata, i: int, qlen: int, slen: int, table: torch.Tensor, num_blocks: int) -> None:
    """The C kernel's index check (bounds.attention_error's codes) for a sequence this path
    gathers: every block of its context (two reductions over one table row a prefill)."""
    bs = meta.block_size
    nblk = -(-slen // bs)
    what = 1 if slen < qlen else 2 if nblk > table.shape[0] else None
    if what is None and nblk:
        used = table[:nblk]
        what = 3 if bool((used < 0).any()) or int(used.max()) >= num_blocks else None
    if what is not None:
        raise attention_error("cpu_amx attention", 1 + 4 * i + what, meta.cu_seqlens_q, meta.seq_lens,
                              meta.block_tables, bs, int(meta.sliding_window or 0), num_blocks, -1)


def attention(backend, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
              dst: torch.Tensor) -> torch.Tensor:
    """Fill ``dst`` [T, Hq, D] (contiguous): long sequences through ``_flash``, each run of
    short ones through ``backend.attention`` (the C kernel) on its slice."""
    qlens, slens = meta.query_lens_host, meta.seq_lens_host
    window = int(meta.sliding_window or 0)
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    i, n = 0, len(qlens)
    while i < n:
        if _long(qlens[i], slens[i]):
            q0, q1, slen = starts[i], starts[i + 1], slens[i]
            table = meta.block_tables[i]
            _check(meta, i, q1 - q0, slen, table, kv_cache.shape[1])
            k = _gather(kv_cache[0], table, slen, meta.block_size)
            v = _gather(kv_cache[1], table, slen, meta.block_size)
            dst[q0:q1] = _flash(q[q0:q1], k.to(q.dtype), v.to(q.dtype), _mask(q1 - q0, slen, window), scale)
            i += 1
            continue
        j = i
        while j < n and not _long(qlens[j], slens[j]):
            j += 1
        q0, q1 = starts[i], starts[j]
        cu = meta.cu_seqlens_q[i:j + 1]
        sub = AttentionMetadata(cu - cu[0], meta.seq_lens[i:j], meta.block_tables[i:j], meta.slot_mapping[q0:q1],
                                max(qlens[i:j]), max(slens[i:j]), qlens[i:j], slens[i:j], meta.block_size,
                                0, meta.sliding_window)
        backend.attention(q[q0:q1], kv_cache, sub, scale, out=dst[q0:q1])
        i = j
    return dst
