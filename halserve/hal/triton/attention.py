"""Paged, varlen, causal GQA attention over the KV cache, driven by AttentionMetadata.

One kernel serves prefill chunks (with a cached prefix) and decode: a program takes
``BLOCK_Q`` query tokens of one sequence and all ``G = Hq / Hk`` query heads that share one
KV head, packed as ``BLOCK_M = BLOCK_Q * G`` rows (GQA packing: each K/V tile is loaded once
for the whole group). Programs map to sequences by a binary search over ``cu_seqlens_q``, so
the grid needs no host-side tile table and a captured graph stays valid as lengths change.

Split-KV (decode of long contexts at small batch, and short prefill chunks over a long
cached prefix, e.g. the tail of a prompt whose prefix was a cache hit): ``NUM_SPLITS > 1``
gives each program an equal share of the key range and writes an unnormalised partial
result; ``_merge_kernel`` combines them. Key tiles are aligned to absolute positions, and a tile that is fully masked
for a row leaves that row's state bit-for-bit unchanged, so with one split a row's result
does not depend on which other rows share its program.

Batch-invariant mode: a token's bits depend on its sequence and position only, not on its
batch, nor on whether it came as a decode row or inside a prefill chunk of any split (the
engine recomputes a preempted request's tokens as a prefill, and a shared token budget decides
where chunks end). Every row runs on the decode tile (one tile shape, warp count and MMA kind)
with its keys in fixed spans of ``BI_SPLIT_KEYS`` counted from key 0, each span an online
softmax from a fresh state, the spans merged in order by one formula (``_span_weights``).
Single-token rows get a program per span (batch 1 still fills the chip) and a merge kernel;
rows of 2+ tokens loop over the spans in their program. Spans and tiles outside a row's keys
(causal limit, window) leave its state bit-for-bit unchanged, so which rows share a program
does not matter. fp contraction is off in these launches, so a formula is its IEEE operations.

KV cache layout: [2, num_blocks, block_size, Hk, D] (the HAL default). An fp8 (e4m3) cache
is upcast to q's dtype right after each tile load (exact: e4m3 fits in bf16/fp16); its
``k_scale`` folds into the softmax scale and ``v_scale`` multiplies the output once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from halserve.hal.triton import configs

_LOG2E = 1.4426950408889634
# batch-invariant split-KV span (keys): decode rows split at fixed absolute positions
BI_SPLIT_KEYS = 32 if configs.interpreting() else 256


@triton.jit
def _find_seq(cu_q_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    # largest i with cu_q[i] // BLOCK_Q + i <= pid: sequence i owns q-blocks from that start
    lo = 0
    hi = num_seqs
    while lo < hi - 1:
        mid = (lo + hi) // 2
        start = tl.load(cu_q_ptr + mid) // BLOCK_Q + mid
        if start <= pid:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _span_weights(m_run, m_span):
    # one ordered step of merging a key span's partial into the running state; the decode
    # merge and the prefill tile's span loop both use it (fp contraction is off in
    # batch-invariant launches, so the same formula is the same fp32 operations)
    m_new = tl.maximum(m_run, m_span)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m_run - m_safe), tl.exp2(m_span - m_safe)


@triton.jit
def _tiles(q, m_i, l_i, acc, t0, t1, kv_lo, kv_hi, pos, window, scale_log2, bt_row, k_ptr, v_ptr, q_ptr,
           c_sb, c_st, c_sh, kvh, d, d_ok,
           BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr, IEEE: tl.constexpr,
           KV_FP8: tl.constexpr):
    # online softmax over key tiles t0..t1 (relative to kv_lo): a tile fully masked for a row
    # leaves that row's state bit-for-bit unchanged
    offs_n = tl.arange(0, BLOCK_N)
    for t in range(t0, t1):
        kpos = kv_lo + t * BLOCK_N + offs_n
        k_ok = kpos < kv_hi
        blk = tl.load(bt_row + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
        coff = blk * c_sb + (kpos % PAGE) * c_st + kvh * c_sh
        kt = tl.load(k_ptr + coff[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        if KV_FP8:
            kt = kt.to(q_ptr.dtype.element_ty)
        if IEEE:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * scale_log2
        ok = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
        if SLIDING:
            ok = ok & (kpos[None, :] > pos[:, None] - window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + coff[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if KV_FP8:
            v = v.to(q_ptr.dtype.element_ty)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _attn_kernel(
    q_ptr, q_st, q_sh, k_ptr, v_ptr, c_sb, c_st, c_sh,
    o_ptr, o_st, o_sh, part_o_ptr, part_ml_ptr,
    cu_q_ptr, seq_lens_ptr, bt_ptr, bt_stride,
    scale_log2, v_scale, num_seqs, window, HQ,
    G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DECODE_ONLY: tl.constexpr, SLIDING: tl.constexpr, IEEE: tl.constexpr, FIXED_SPAN: tl.constexpr,
    KV_FP8: tl.constexpr, SKIP_SINGLE: tl.constexpr, SPAN_LOOP: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE_ONLY:
        seq = pid
        qb = 0
    else:
        seq = _find_seq(cu_q_ptr, pid, num_seqs, BLOCK_Q)
        qb = pid - (tl.load(cu_q_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if qb * BLOCK_Q >= q_len:
        return
    if FIXED_SPAN > 0:  # batch-invariant decode launch: single-token rows only
        if q_len != 1:
            return
    if SKIP_SINGLE:  # batch-invariant prefill launch: single-token rows are the decode launch's
        if q_len == 1:
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    qi = rows // G
    head = kvh * G + rows % G
    q_idx = qb * BLOCK_Q + qi  # index inside this sequence's query tokens
    row_ok = (qi < BLOCK_Q) & (q_idx < q_len)
    pos = ctx_len + q_idx  # absolute position of each row's token
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    tok = (q_start + q_idx).to(tl.int64)

    q = tl.load(q_ptr + tok[:, None] * q_st + head[:, None] * q_sh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        q = q.to(tl.float32)

    # key range of this program: up to the last row's position; absolute tile alignment
    last_pos = ctx_len + tl.minimum((qb + 1) * BLOCK_Q, q_len) - 1
    kv_hi = tl.minimum(last_pos + 1, seq_len)
    kv_lo = 0
    if SLIDING:
        first_pos = ctx_len + qb * BLOCK_Q
        kv_lo = tl.maximum(first_pos - window + 1, 0)
        kv_lo = (kv_lo // BLOCK_N) * BLOCK_N
    n_tiles = tl.cdiv(kv_hi - kv_lo, BLOCK_N)
    if SPAN_LOOP > 0:
        # batch-invariant rows of 2+ tokens: the decode launch's spans (SPAN_LOOP key tiles from
        # absolute tile 0), each from a fresh state with the same tile loop, merged in order
        # with the decode merge's formula; spans and tiles outside a row's keys leave it as is
        lo_t = kv_lo // BLOCK_N
        hi_t = lo_t + n_tiles
        bt_row = bt_ptr + seq.to(tl.int64) * bt_stride
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for sp in range(lo_t // SPAN_LOOP, tl.cdiv(hi_t, SPAN_LOOP)):
            a0 = tl.maximum(sp * SPAN_LOOP, lo_t) - lo_t
            a1 = tl.minimum(sp * SPAN_LOOP + SPAN_LOOP, hi_t) - lo_t
            ms, ls, accs = _tiles(q, tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
                                  tl.zeros([BLOCK_M, BLOCK_D], tl.float32), a0, a1, kv_lo, kv_hi, pos, window,
                                  scale_log2, bt_row, k_ptr, v_ptr, q_ptr, c_sb, c_st, c_sh, kvh, d, d_ok,
                                  BLOCK_N, PAGE, SLIDING, IEEE, KV_FP8)
            if KV_FP8:
                accs = accs * v_scale
            m_i, wa, wb = _span_weights(m_i, ms)
            l_i = l_i * wa + ls * wb
            acc = acc * wa[:, None] + accs * wb[:, None]
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_ptr + tok[:, None] * o_st + head[:, None] * o_sh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        return
    if FIXED_SPAN > 0:
        # batch-invariant decode: split s is the row's s-th span of FIXED_SPAN key tiles,
        # counted from absolute tile 0 (so a prefill row at the same position sees the same
        # spans), from the span of the row's first tile. Spans used: from the row's own length
        # (the merge recounts them alike), at least one (an empty row stores an empty partial),
        # capped by the grid with the last span then taking the rest (a wrong bound must not
        # drop keys; within the bound the cap never applies)
        lo_t = kv_lo // BLOCK_N
        first = lo_t // FIXED_SPAN
        used = tl.minimum(tl.maximum(tl.cdiv(lo_t + n_tiles, FIXED_SPAN) - first, 1), NUM_SPLITS)
        if split >= used:
            return
        t0 = tl.maximum((first + split) * FIXED_SPAN, lo_t) - lo_t
        t1 = tl.where(split == used - 1, n_tiles, tl.minimum((first + split + 1) * FIXED_SPAN - lo_t, n_tiles))
    elif NUM_SPLITS > 1:
        per = tl.cdiv(n_tiles, NUM_SPLITS)
        t0 = split * per
        t1 = tl.minimum(t0 + per, n_tiles)
    else:
        t0 = 0
        t1 = n_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * bt_stride
    m_i, l_i, acc = _tiles(q, m_i, l_i, acc, t0, t1, kv_lo, kv_hi, pos, window, scale_log2, bt_row, k_ptr, v_ptr,
                           q_ptr, c_sb, c_st, c_sh, kvh, d, d_ok, BLOCK_N, PAGE, SLIDING, IEEE, KV_FP8)
    if KV_FP8:
        acc = acc * v_scale  # linear in V: one multiply instead of one per tile

    if FIXED_SPAN > 0:
        # partials by sequence, [num_seqs, HQ, S, D] and [.., 2]: _merge_kernel(BY_SEQ)
        prow = (seq.to(tl.int64) * HQ + head) * NUM_SPLITS + split
        tl.store(part_o_ptr + prow[:, None] * HEAD_D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_ml_ptr + prow * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + prow * 2 + 1, l_i, mask=row_ok)
    elif NUM_SPLITS > 1:
        # partials: o [T, HQ, S, D] fp32 unnormalised, ml [T, HQ, S, 2]
        prow = (tok * HQ + head) * NUM_SPLITS + split
        tl.store(part_o_ptr + prow[:, None] * HEAD_D + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_ml_ptr + prow * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + prow * 2 + 1, l_i, mask=row_ok)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_ptr + tok[:, None] * o_st + head[:, None] * o_sh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(part_o_ptr, part_ml_ptr, o_ptr, o_st, o_sh, HQ, cu_q_ptr, seq_lens_ptr, window,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BY_SEQ: tl.constexpr,
                  BLOCK_N: tl.constexpr = 1, FIXED_SPAN: tl.constexpr = 1, SLIDING: tl.constexpr = False):
    # BY_SEQ: partials are by sequence (batch-invariant split-KV); only single-token rows merge
    if BY_SEQ:
        seq = tl.program_id(0)
        start = tl.load(cu_q_ptr + seq)
        if tl.load(cu_q_ptr + seq + 1) - start != 1:
            return
        tok = start.to(tl.int64)
        row = seq.to(tl.int64)
        # the decode launch's key tiles and span count of this row (same formulas)
        seq_len = tl.load(seq_lens_ptr + seq)
        kv_lo = 0
        if SLIDING:
            kv_lo = tl.maximum(seq_len - window, 0)
            kv_lo = (kv_lo // BLOCK_N) * BLOCK_N
        lo_t = kv_lo // BLOCK_N
        used = tl.minimum(tl.maximum(tl.cdiv(tl.cdiv(seq_len, BLOCK_N), FIXED_SPAN) - lo_t // FIXED_SPAN, 1),
                          NUM_SPLITS)
    else:
        tok = tl.program_id(0).to(tl.int64)
        row = tok
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    base = (row * HQ + head) * NUM_SPLITS
    if BY_SEQ:
        # the row's own spans, one at a time, in order, each by _span_weights' step (the
        # prefill tile's span loop does the same): the sum never depends on how many splits
        # the grid had (a batch-wide count), nor on whether the row came as a decode row
        m_run = tl.full([], float("-inf"), tl.float32)
        l_tot = 0.0
        acc = tl.zeros([BLOCK_D], tl.float32)
        for i in range(0, used):
            m_run, wa, wb = _span_weights(m_run, tl.load(part_ml_ptr + (base + i) * 2))
            l_tot = l_tot * wa + tl.load(part_ml_ptr + (base + i) * 2 + 1) * wb
            acc = acc * wa + tl.load(part_o_ptr + (base + i) * HEAD_D + d, mask=d < HEAD_D, other=0.0) * wb
    else:
        s = tl.arange(0, NUM_SPLITS)
        m = tl.load(part_ml_ptr + (base + s) * 2)
        l = tl.load(part_ml_ptr + (base + s) * 2 + 1)
        m_max = tl.max(m, axis=0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_safe)  # splits that saw no key have m=-inf -> weight 0
        l_tot = tl.sum(l * w, axis=0)
        po = tl.load(part_o_ptr + (base + s)[:, None] * HEAD_D + d[None, :], mask=(d < HEAD_D)[None, :], other=0.0)
        acc = tl.sum(po * w[:, None], axis=0)
    l_tot = tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(o_ptr + tok * o_st + head * o_sh + d, (acc / l_tot).to(o_ptr.dtype.element_ty), mask=d < HEAD_D)


def _num_splits(num_seqs: int, hk: int, max_seqlen_k: int | None, block_n: int) -> int:
    """Split the key range only when the grid would leave most of the chip idle."""
    if configs.interpreting():
        return 2 if (max_seqlen_k or 0) > 2 * block_n else 1
    progs = num_seqs * hk
    sms = configs.num_sms()
    if progs >= sms:
        return 1
    splits = 1
    while splits < 32 and progs * splits * 2 <= 2 * sms:
        splits *= 2
    if max_seqlen_k is not None:  # eager: no more splits than key tiles
        tiles = triton.cdiv(max_seqlen_k, block_n)
        while splits > 1 and splits > tiles:
            splits //= 2
    return splits


def attention(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
              block_tables: torch.Tensor, block_size: int, max_seqlen_q: int, max_seqlen_k: int | None,
              scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None,
              batch_invariant: bool = False, kv_len_bound: int | None = None, k_scale: float = 1.0,
              v_scale: float = 1.0) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]. ``max_seqlen_k=None`` means 'unknown' (graph capture):
    the split count then depends on the batch shape only. Batch-invariant mode: every row on
    the decode tile with its keys in spans of ``BI_SPLIT_KEYS`` from key 0, merged in order
    (``_bi_launches``), so a token's bits depend on its sequence and position only; the decode
    grid's split count comes from ``kv_len_bound`` (any upper bound of the context lengths, e.g.
    max_model_len) when ``max_seqlen_k`` is None. An fp8 cache reads as stored * k_scale / v_scale."""
    from halserve.hal.kv_fp8 import is_fp8

    T, HQ, D = q.shape
    HK = kv_cache.shape[-2]
    G = HQ // HK
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or num_seqs == 0:
        return out
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and kv_cache.is_contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_d = triton.next_power_of_2(D)
    ieee = q.dtype == torch.float32 or configs.interpreting()  # interpreter: no bf16 dot
    common = (cu_seqlens_q, seq_lens, block_tables, block_tables.stride(0),
              float(scale) * float(k_scale) * _LOG2E, float(v_scale), num_seqs, int(sliding_window or 0), HQ)
    flags = dict(G=G, PAGE=int(block_size), HEAD_D=D, BLOCK_D=block_d, SLIDING=bool(sliding_window), IEEE=ieee,
                 KV_FP8=is_fp8(kv_cache.dtype))

    def launch(grid, cfg, out_or_part, part_ml, **kw):
        _attn_kernel[grid](q, q.stride(0), q.stride(1), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
                           k_cache.stride(2), out, out.stride(0), out.stride(1), out_or_part, part_ml, *common,
                           BLOCK_N=cfg["block_n"], **flags, **kw, **configs.launch_opts(cfg))

    if batch_invariant:
        _bi_launches(launch, out, T, cu_seqlens_q, seq_lens, num_seqs, HK, G, HQ, D, block_d, sliding_window,
                     max_seqlen_q, max_seqlen_k if max_seqlen_k is not None else kv_len_bound, q.device)
        return out

    decode = max_seqlen_q == 1
    cfg = configs.attn_config(decode)
    if decode:
        block_q = 1
        block_m = max(16, triton.next_power_of_2(G))
    else:
        block_m = max(cfg["block_m"], triton.next_power_of_2(G))
        block_q = max(block_m // triton.next_power_of_2(G), 1)
        if max_seqlen_q < block_q:  # short chunks: don't waste rows
            block_q = triton.next_power_of_2(max_seqlen_q)
            block_m = max(16, triton.next_power_of_2(block_q * G))
    block_n = cfg["block_n"]
    grid0 = num_seqs if decode else T // block_q + num_seqs
    if decode:
        splits = _num_splits(num_seqs, HK, max_seqlen_k, block_n)
    else:  # a short chunk over a long cached prefix (a prefix hit) would leave the chip idle
        splits = _num_splits(grid0, HK, max_seqlen_k, block_n)
    if splits > 1:
        part_o = torch.empty((T, HQ, splits, D), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((T, HQ, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out
    launch((grid0, HK, splits), cfg, part_o, part_ml, BLOCK_Q=block_q, BLOCK_M=block_m, NUM_SPLITS=splits,
           DECODE_ONLY=decode, FIXED_SPAN=0, SKIP_SINGLE=False)
    if splits > 1:
        _merge_kernel[(T, HQ)](part_o, part_ml, out, out.stride(0), out.stride(1), HQ, cu_seqlens_q, seq_lens, 0,
                               HEAD_D=D, BLOCK_D=block_d, NUM_SPLITS=splits, BY_SEQ=False, num_warps=4)
    return out


def _bi_launches(launch, out, T, cu_seqlens_q, seq_lens, num_seqs, HK, G, HQ, D, block_d, sliding_window,
                 max_seqlen_q, bound, device):
    """Batch-invariant mode. Every row runs on the decode tile (its config, BLOCK_M and warps:
    the same MMA shapes and reduction layouts, so a row's arithmetic is the same in either
    launch) with its keys in spans of ``BI_SPLIT_KEYS`` counted from key 0, merged in span
    order by one formula. Single-token rows: one program per (sequence, KV head, span), the
    partials merged by ``_merge_kernel``; the grid's split count comes from ``bound`` only
    (static under graph capture) and each row uses and merges just its own spans. Rows of 2+
    tokens: ``BLOCK_M // G`` tokens a program, the spans looped and merged in the program.
    So a token's bits depend on its sequence and position only, not on its batch, nor on
    whether it came as a decode row or inside a prefill chunk of any split. fp contraction
    is off in these launches: each formula is then exactly its IEEE operations, wherever the
    compiler puts it."""
    cfg = configs.attn_config(True)
    block_n = cfg["block_n"]
    span = max(BI_SPLIT_KEYS // block_n, 1)
    block_m = max(16, triton.next_power_of_2(G))
    exact = dict(enable_fp_fusion=False)
    splits = triton.next_power_of_2(max(triton.cdiv(triton.cdiv(bound or 1, block_n), span), 1))
    part_o = torch.empty((num_seqs, HQ, splits, D), dtype=torch.float32, device=device)
    part_ml = torch.empty((num_seqs, HQ, splits, 2), dtype=torch.float32, device=device)
    launch((num_seqs, HK, splits), cfg, part_o, part_ml, BLOCK_Q=1, BLOCK_M=block_m, NUM_SPLITS=splits,
           DECODE_ONLY=True, FIXED_SPAN=span, SKIP_SINGLE=False, **exact)
    _merge_kernel[(num_seqs, HQ)](part_o, part_ml, out, out.stride(0), out.stride(1), HQ, cu_seqlens_q, seq_lens,
                                  int(sliding_window or 0), HEAD_D=D, BLOCK_D=block_d, NUM_SPLITS=splits, BY_SEQ=True,
                                  BLOCK_N=block_n, FIXED_SPAN=span, SLIDING=bool(sliding_window), num_warps=4,
                                  **exact)
    if max_seqlen_q > 1:
        block_q = max(block_m // triton.next_power_of_2(G), 1)
        launch((T // block_q + num_seqs, HK, 1), cfg, out, out, BLOCK_Q=block_q, BLOCK_M=block_m, NUM_SPLITS=1,
               DECODE_ONLY=False, FIXED_SPAN=0, SKIP_SINGLE=True, SPAN_LOOP=span, **exact)
