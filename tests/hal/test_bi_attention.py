"""Batch-invariant attention (hal/triton/attention.py): every row runs on the decode tile with
its keys in fixed spans from key 0, so its output is bitwise the same alone, inside batches of
every size, beside any other lengths and beside prefill chunks, eager or graph-form (a length
bound instead of the batch's lengths), and a token's output is the same whether it came as a
decode row or inside a prefill chunk of any split. On the CPU under TRITON_INTERPRET=1 (or on
a GPU when there is one)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.triton_here import DEV, ON_GPU  # noqa: E402,F401 (first: it sets the interpreter up)

from halserve.hal.interface import AttentionMetadata  # noqa: E402
from halserve.hal.native import NativeBackend  # noqa: E402

BS = 16  # KV block size
HEAD_D = 128 if ON_GPU else 32  # the GPU runs the real head size (tile shapes follow it)
# bf16 on the GPU is the dtype served; the interpreter gets bf16 wrong (and is slow)
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


def _close(a, b):
    tol = 1e-5 if a.dtype == torch.float32 else 2e-2
    return torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def _span() -> int:
    from halserve.hal.triton.attention import BI_SPLIT_KEYS

    return BI_SPLIT_KEYS


class Pool:
    """Sequences with fixed block tables, query rows and a shared KV cache: any subset, in any
    order, forms a batch, so one sequence's output can be compared across batches."""

    def __init__(self, specs, hq, hk, d, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.specs = specs  # [(q_len, seq_len)]
        self.maxb = max(-(-s // BS) for _, s in specs)
        nblocks = self.maxb * len(specs) + 3
        perm = torch.randperm(nblocks, generator=g)[: len(specs) * self.maxb].view(len(specs), self.maxb)
        self.tables = perm.to(torch.int32)
        self.cache = torch.randn(2, nblocks, BS, hk, d, generator=g).to(dtype).to(DEV)
        self.q = [torch.randn(q, hq, d, generator=g).to(dtype).to(DEV) for q, _ in specs]
        self.scale = 1 / math.sqrt(d)

    def batch(self, ids, window=None, bound=None):
        qlens = [self.specs[i][0] for i in ids]
        slens = [self.specs[i][1] for i in ids]
        cu = [0]
        for n in qlens:
            cu.append(cu[-1] + n)
        slots = []
        for i in ids:
            q, s = self.specs[i]
            slots += [int(self.tables[i, p // BS]) * BS + p % BS for p in range(s - q, s)]
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEV),
            seq_lens=torch.tensor(slens, dtype=torch.int32, device=DEV),
            block_tables=self.tables[list(ids)].to(DEV), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV),
            max_seqlen_q=max(qlens), max_seqlen_k=bound or max(slens), query_lens_host=qlens, seq_lens_host=slens,
            block_size=BS, num_decode_seqs=0, sliding_window=window)
        return torch.cat([self.q[i] for i in ids]).contiguous(), meta, cu

    def run(self, be, ids, window=None, bound=None):
        """Outputs of batch ``ids``, per sequence."""
        q, meta, cu = self.batch(ids, window, bound)
        out = be.attention(q, self.cache, meta, self.scale)
        return {i: out[cu[j]:cu[j + 1]] for j, i in enumerate(ids)}


@pytest.fixture(scope="module")
def bi():
    from halserve.hal.cuda import CudaBackend

    return CudaBackend(DEV, batch_invariant=True)


def _pool(hq=8, hk=2, d=HEAD_D, window=None, seed=0, dtype=torch.float32):
    sp = _span()
    # decode rows: one key, inside one span, exactly one span, several spans, past a power of
    # two of spans; prefill chunks: a fresh prompt, a chunk over a cached prefix, two tokens
    decode = [(1, 1), (1, 9), (1, sp), (1, 3 * sp + 5), (1, 5 * sp + 11), (1, 2 * sp - 1)]
    prefill = [(21, 21), (7, 4 * sp + 3), (2, sp + 2)]
    return Pool(decode + prefill, hq, hk, d, dtype, seed), list(range(len(decode))), list(range(len(decode), len(decode) + 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(8, 2), (3, 1)])  # GQA 4, GQA 3 (not a power of two)
def test_decode_row_bits_alone_and_in_every_batch(bi, hq, hk, dtype):
    pool, dec, pre = _pool(hq, hk, dtype=dtype)
    native = NativeBackend(DEV)
    alone = {i: pool.run(bi, [i])[i] for i in dec + pre}
    for i in dec + pre:  # and right
        ref = pool.run(native, [i])[i]
        assert _close(alone[i], ref), f"sequence {pool.specs[i]} vs native"
    g = torch.Generator().manual_seed(1)
    batches = [dec, dec[::-1], dec[:2], [dec[4], dec[0]], dec + pre, pre[:1] + dec[3:] + pre[1:] + dec[:3],
               [pre[1], dec[2]]]
    batches += [[int(x) for x in torch.randperm(len(dec) + len(pre), generator=g)[:n]] for n in (3, 7)]
    for ids in batches:
        got = pool.run(bi, ids)
        for i in ids:
            assert torch.equal(got[i], alone[i]), f"sequence {pool.specs[i]} in batch {[pool.specs[j] for j in ids]}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_form_bound_gives_the_same_bits(bi, dtype):
    """Under graph capture the split count comes from a length bound, not the batch: the bits
    must not move, for any bound at or above the real lengths."""
    pool, dec, pre = _pool(dtype=dtype)
    eager = pool.run(bi, dec)
    for bound in (max(s for _, s in pool.specs), 7 * _span(), 16 * _span()):
        got = pool.run(bi, dec, bound=bound)
        for i in dec:
            assert torch.equal(got[i], eager[i]), f"bound {bound}, sequence {pool.specs[i]}"


def test_padding_rows_and_a_wrong_bound(bi):
    """A graph's padding row (no context) gives zeros and leaves its neighbours' bits alone;
    a bound below the real lengths still attends to every key (the last span takes the rest)."""
    pool, dec, _ = _pool()
    q, meta, cu = pool.batch(dec)
    full = bi.attention(q, pool.cache, meta, pool.scale)
    meta.seq_lens[1] = 0
    padded = bi.attention(q, pool.cache, meta, pool.scale)
    assert torch.equal(padded[1], torch.zeros_like(padded[1]))
    keep = [j for j in range(len(dec)) if j != 1]
    assert torch.equal(padded[keep], full[keep])
    short = pool.run(bi, dec, bound=_span())  # one span in the grid, rows with up to six
    ref = pool.run(NativeBackend(DEV), dec)
    for i in dec:
        assert _close(short[i], ref[i]), f"sequence {pool.specs[i]}"


def test_sliding_window_decode_rows(bi):
    window = _span() + 7  # the first key tile moves with the row; spans count from it
    pool, dec, pre = _pool(window=window, seed=3)
    native = NativeBackend(DEV)
    alone = {i: pool.run(bi, [i], window=window)[i] for i in dec}
    ref = pool.run(native, dec + pre, window=window)
    mixed = pool.run(bi, pre + dec[::-1], window=window)
    for i in dec:
        assert _close(alone[i], ref[i]), f"sequence {pool.specs[i]} vs native"
        assert torch.equal(mixed[i], alone[i]), f"sequence {pool.specs[i]}"


def test_decode_rows_take_the_decode_tile(bi, monkeypatch):
    """The point of the design (speed): single-token rows run on the decode tile (BLOCK_M =
    the GQA group padded to 16, one query token), in mixed batches too; the prefill tile's
    launch leaves them alone."""
    from halserve.hal.triton import attention as A

    seen = []
    real = A._attn_kernel

    class Spy:
        def __getitem__(self, grid):
            def call(*args, **kw):
                seen.append(dict(grid=grid, **{k: kw.get(k, 0) for k in ("BLOCK_Q", "BLOCK_M", "DECODE_ONLY",
                                                                         "FIXED_SPAN", "SKIP_SINGLE", "NUM_SPLITS",
                                                                         "SPAN_LOOP", "BLOCK_N", "num_warps")}))
                return real[grid](*args, **kw)
            return call

    monkeypatch.setattr(A, "_attn_kernel", Spy())
    pool, dec, pre = _pool()
    pool.run(bi, dec)
    assert len(seen) == 1 and seen[0]["DECODE_ONLY"] and seen[0]["BLOCK_Q"] == 1 and seen[0]["BLOCK_M"] == 16
    assert seen[0]["FIXED_SPAN"] > 0
    seen.clear()
    pool.run(bi, dec + pre)
    assert [s["DECODE_ONLY"] for s in seen] == [True, False]
    assert seen[1]["SKIP_SINGLE"] and seen[1]["NUM_SPLITS"] == 1 and seen[1]["BLOCK_Q"] > 1
    # rows of 2+ tokens: the decode tile's shape and warps, the decode launch's spans
    assert seen[1]["SPAN_LOOP"] == seen[0]["FIXED_SPAN"]
    assert all(seen[1][k] == seen[0][k] for k in ("BLOCK_M", "BLOCK_N", "num_warps"))


class Seqs:
    """Whole sequences (every position's query and a written cache): a batch is a list of
    chunks (sequence, first token, end), each a batch row with ``end`` keys, so the same token
    can be computed as a decode row, in any chunk and beside any other rows."""

    def __init__(self, lens, hq, hk, d, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.maxb = max(-(-n // BS) for n in lens)
        nblocks = self.maxb * len(lens) + 2
        self.tables = torch.randperm(nblocks, generator=g)[: len(lens) * self.maxb].view(len(lens), self.maxb)
        self.tables = self.tables.to(torch.int32)
        self.cache = torch.randn(2, nblocks, BS, hk, d, generator=g).to(dtype).to(DEV)
        self.q = [torch.randn(n, hq, d, generator=g).to(dtype).to(DEV) for n in lens]
        self.scale = 1 / math.sqrt(d)

    def run(self, be, chunks, window=None, **scales):
        """{(sequence, position): output row} for every token of ``chunks``."""
        qlens = [e - s for _, s, e in chunks]
        cu = [0]
        for n in qlens:
            cu.append(cu[-1] + n)
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEV),
            seq_lens=torch.tensor([e for *_, e in chunks], dtype=torch.int32, device=DEV),
            block_tables=self.tables[[i for i, *_ in chunks]].to(DEV),
            slot_mapping=torch.zeros(cu[-1], dtype=torch.int64, device=DEV),  # attention reads only
            max_seqlen_q=max(qlens), max_seqlen_k=max(e for *_, e in chunks), query_lens_host=qlens,
            seq_lens_host=[e for *_, e in chunks], block_size=BS, num_decode_seqs=0, sliding_window=window)
        q = torch.cat([self.q[i][s:e] for i, s, e in chunks]).contiguous()
        out = be.attention(q, self.cache, meta, self.scale, **scales)
        return {(i, p): out[cu[j] + p - s] for j, (i, s, e) in enumerate(chunks) for p in range(s, e)}


def _split(n, cuts):
    edges = [0] + sorted(set(c for c in cuts if 0 < c < n)) + [n]
    return [(a, b) for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("hq,hk,window,fp8", [(8, 2, None, False), (3, 1, "span+7", False), (4, 2, None, True)])
def test_a_token_has_the_same_bits_in_every_chunking(bi, hq, hk, window, fp8):
    """A token's output is the same as a decode row, in one prefill, after a prefix computed as
    a prefill, and in any chunk split (1-token chunks, chunks crossing spans), beside other
    sequences' rows in the batch: what a preempted-and-recomputed or differently-chunked
    request meets in the engine."""
    sp = _span()
    w = sp + 7 if window else None
    L = 2 * sp + 9  # three spans (two would not show a wrong merge order), the last one partial
    seqs = Seqs([L, 2 * sp + 3], hq, hk, HEAD_D, seed=5)
    scales = {}
    if fp8:  # an e4m3 cache: v_scale applies to each span's partial, in both launches
        seqs.cache = seqs.cache.to(torch.float8_e4m3fn)
        scales = dict(k_scale=0.5, v_scale=0.7)  # not a power of two: where it applies shows
    ref = seqs.run(bi, [(0, 0, L), (1, 0, 2 * sp + 3)], w, **scales)  # (a): one prefill each
    native = seqs.run(NativeBackend(DEV), [(0, 0, L)], w, **scales)
    for p in range(L):
        assert _close(ref[0, p], native[0, p]), f"position {p} vs native"
    g = torch.Generator().manual_seed(2)
    other = [(1, a, b) for a, b in _split(2 * sp + 3, [5, 6, sp + 1])]
    ways = {
        # (b) every token as a decode row once: the first span's and the next, alone, the rest
        # after a prefix computed as a prefill, beside the other sequence's chunks
        "decode rows": [(0, p, p + 1) for p in range(sp + 2)],
        "prefill + decode rows": [(0, 0, sp + 2)] + [(0, p, p + 1) for p in range(sp + 2, L)][::-1] + other,
        "1-token chunks and span-crossing chunks": other[::-1] + [(0, a, b) for a, b in _split(L, [1, 2, 3, sp - 1,
                                                                                                    sp + 1, 2 * sp + 2,
                                                                                                    L - 1])],
    }
    for n in (6,):  # (c) a random split, shuffled among the other sequence's chunks
        cuts = torch.randperm(L - 1, generator=g)[:n].add(1).tolist()
        mixed = [(0, a, b) for a, b in _split(L, cuts)] + other
        ways[f"random split {sorted(cuts)}"] = [mixed[i] for i in torch.randperm(len(mixed), generator=g).tolist()]
    for name, chunks in ways.items():
        got = seqs.run(bi, chunks, w, **scales)
        for (i, p), row in got.items():
            assert torch.equal(row, ref[i, p]), f"{name}: sequence {i} position {p}"
