"""Indices out of range (docs/backends.md, "Indices"): every runnable CPU backend raises a
clear error on a KV slot past the cache, a position past the cos/sin table, a block id past
the cache, a context past its block table's row, a block copy past a cache and an expert past
the weights, and changes no byte outside the rows a good index names. The C backends
(cpu_amx, riscv_rvv) check in their kernels and raise IndexError naming the op and the bad
value; native raises torch's error (IndexError, or RuntimeError from its gather). A kernel
that trusted the index would write past the tensor or segfault (mutation-checked by hand in a
subprocess: each check removed, these tests fail or the process dies)."""
from __future__ import annotations

import pytest
import torch

from halserve import hal
from halserve.hal import conformance as C
from halserve.hal.interface import AttentionMetadata, MoeSpec
from halserve.hal.rope import build_rope_cache

BACKENDS = [name for name, _ in C.runnable_backends() if name in ("native", "cpu_amx", "riscv_rvv")]
C_BACKENDS = [n for n in BACKENDS if n != "native"]
NB, BS, HK, HQ, D = 6, 4, 2, 4, 16  # cache blocks, block size, kv heads, query heads, head size
NSLOTS = NB * BS
_made: dict = {}


def _be(name):
    if name not in _made:
        _made[name] = hal.create(name)
    return _made[name]


def _errors(name):
    """What each backend raises: the C ones their own IndexError, native torch's."""
    return IndexError if name != "native" else (IndexError, RuntimeError)


def _says(name, err, op, *values):
    """A C backend's message names the op and every value given (native's are torch's own)."""
    msg = str(err.value)
    if name != "native":
        assert f"{name} {op}" in msg and all(str(v) in msg for v in values), msg


def _cache(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, NB, BS, HK, D, generator=g).to(dtype)


def _changed_slots(before, after) -> set:
    diff = (before.view(2, NSLOTS, -1) != after.view(2, NSLOTS, -1)).any(-1).any(0)
    return set(diff.nonzero().flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [NSLOTS, NSLOTS + 1000])
@pytest.mark.parametrize("name", BACKENDS)
def test_write_kv_slot_past_the_cache(name, bad, dtype):
    be = _be(name)
    cache = _cache(dtype)
    before = cache.clone()
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(4, HK, D, generator=g).to(dtype) for _ in range(2))
    slots = torch.tensor([3, bad, -1, 9])
    with pytest.raises(_errors(name)) as err:
        be.write_kv(k, v, cache, slots)
    _says(name, err, "write_kv", bad, NSLOTS)
    # only the good rows' slots may change, and only to those rows
    assert _changed_slots(before, cache) <= {3, 9}
    for t, s in ((0, 3), (3, 9)):
        kv = cache.view(2, NSLOTS, HK, D)
        assert torch.equal(kv[0, s], k[t]) or torch.equal(kv[0, s], before.view(2, NSLOTS, HK, D)[0, s])


@pytest.mark.parametrize("name", BACKENDS)
def test_write_kv_negative_slots_still_skip(name):
    """-1 (and any negative slot) is padding: skipped, no error."""
    be = _be(name)
    cache = _cache(torch.float32)
    before = cache.clone()
    k = torch.randn(3, HK, D)
    be.write_kv(k, k, cache, torch.tensor([-1, 5, -7]))
    assert _changed_slots(before, cache) == {5}


def _rope(rows):
    return build_rope_cache(D, D, rows, 10000.0)


@pytest.mark.parametrize("bad", [32, -1, 10 ** 6])
@pytest.mark.parametrize("name", BACKENDS)
def test_rotary_position_past_the_table(name, bad):
    be = _be(name)
    cs = _rope(32)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(3, HQ, D, generator=g), torch.randn(3, HK, D, generator=g)
    q0, k0 = q.clone(), k.clone()
    pos = torch.tensor([4, bad, 7])
    with pytest.raises(_errors(name)) as err:
        be.rotary(pos, q, k, cs)
    _says(name, err, "rotary", bad, 32)
    # the bad token untouched; good ones as the backend rotates them alone, or untouched
    assert torch.equal(q[1], q0[1]) and torch.equal(k[1], k0[1])
    qr, kr = q0[[0, 2]].clone(), k0[[0, 2]].clone()
    be.rotary(torch.tensor([4, 7]), qr, kr, cs)
    for i, j in ((0, 0), (2, 1)):
        assert (torch.equal(q[i], qr[j]) and torch.equal(k[i], kr[j])) or (
            torch.equal(q[i], q0[i]) and torch.equal(k[i], k0[i]))


@pytest.mark.parametrize("case", ["position", "slot"])
@pytest.mark.parametrize("name", BACKENDS)
def test_rotary_write_kv_bad_index(name, case):
    be = _be(name)
    cs = _rope(32)
    cache = _cache(torch.float32)
    before = cache.clone()
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, HQ, D, generator=g), torch.randn(3, HK, D, generator=g), torch.randn(3, HK, D, generator=g)
    pos = torch.tensor([1, 40 if case == "position" else 2, 3])
    slots = torch.tensor([4, 11, NSLOTS + 2 if case == "slot" else 17])
    with pytest.raises(_errors(name)) as err:
        be.rotary_write_kv(pos, q, k, v, cs, True, cache, slots)
    _says(name, err, "rotary_write_kv" if name == "cpu_amx" else "rotary" if case == "position" else "write_kv",
          *((40, 32) if case == "position" else (NSLOTS + 2, NSLOTS)))
    # a token with a bad position writes no slot; a bad slot is written by no one
    good = {4, 17} if case == "position" else {4, 11}
    assert _changed_slots(before, cache) <= good


def _meta(seq_lens, tables, qlens, cu=None):
    c = [0]
    for n in qlens:
        c.append(c[-1] + n)
    dec = len(qlens) if all(n == 1 for n in qlens) else 0
    return AttentionMetadata(torch.tensor(cu or c, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
                             torch.tensor(tables, dtype=torch.int32), torch.full((c[-1],), -1, dtype=torch.int64),
                             max(qlens), max(seq_lens), list(qlens), list(seq_lens), BS, dec)


def _attend(be, meta, dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(meta.cu_seqlens_q[-1].item() if meta.num_seqs else 0, HQ, D, generator=g).to(dtype)
    cache = _cache(dtype)
    before = cache.clone()
    try:
        return be.attention(q, cache, meta, D ** -0.5)
    finally:
        assert torch.equal(cache, before)  # attention never writes the cache, whatever it is given


# (seq_lens, tables, query lens, the value the error must name)
ATTN_BAD = {
    "decode block past the cache": ([6], [[0, NB, 1]], [1], NB),
    "decode negative block": ([6], [[2, -1, 1]], [1], -1),
    "context past the table": ([3 * BS + 1], [[0, 1, 2]], [1], 3 * BS + 1),
    "batch: second row's block": ([3, 9], [[0, 0, 0], [1, 2, NB + 5]], [1, 1], NB + 5),
    "prefill block past the cache": ([40], [[0, 1, 2, 3, 4, 5, 1, 2, 3, NB]], [40], NB),  # cpu_amx's flash path
    "chunk after a prefix": ([12], [[0, 1, NB]], [3], NB),
}


@pytest.mark.parametrize("case", list(ATTN_BAD))
@pytest.mark.parametrize("name", BACKENDS)
def test_attention_bad_block_or_length(name, case):
    be = _be(name)
    seq_lens, tables, qlens, value = ATTN_BAD[case]
    with pytest.raises(_errors(name)) as err:
        _attend(be, _meta(seq_lens, tables, qlens))
    _says(name, err, "attention", value)


@pytest.mark.parametrize("name", BACKENDS)
def test_attention_reads_only_its_blocks(name):
    """Table entries past the batch's longest context's blocks (padding) may hold anything: not
    read, no error; the output is the same as with zero padding."""
    be = _be(name)
    good = _attend(be, _meta([5, 2], [[3, 1, 0, 0], [4, 0, 0, 0]], [1, 1]))
    junk = _attend(be, _meta([5, 2], [[3, 1, 10 ** 6, -5], [4, 0, NB, 99]], [1, 1]))
    assert torch.equal(good, junk)


C_ONLY_BAD = {
    "cu_seqlens_q past the rows": ([4], [[0, 1]], [1], [0, 3], 3),
    "cu_seqlens_q decreasing": ([4, 4], [[0, 1], [2, 3]], [1, 1], [0, 2, 1], 2),
    "context shorter than the query": ([2], [[0, 1]], [3], None, 2),
}


@pytest.mark.parametrize("case", list(C_ONLY_BAD))
@pytest.mark.parametrize("name", C_BACKENDS)
def test_attention_bad_lengths_c_kernels(name, case):
    """Device lengths the C kernels index by (native slices by the host lists instead)."""
    be = _be(name)
    seq_lens, tables, qlens, cu, value = C_ONLY_BAD[case]
    meta = _meta(seq_lens, tables, qlens, cu)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(qlens), HQ, D, generator=g)
    with pytest.raises(IndexError) as err:
        be.attention(q, _cache(torch.float32), meta, 0.25)
    _says(name, err, "attention", value)


@pytest.mark.parametrize("op", ["copy_blocks", "swap_blocks"])
@pytest.mark.parametrize("name", BACKENDS)
def test_block_copy_past_the_cache(name, op):
    be = _be(name)
    cache = _cache(torch.float32)
    before = cache.clone()
    mapping = torch.tensor([[0, 1], [2, NB]])
    with pytest.raises(_errors(name)) as err:
        if op == "copy_blocks":
            be.copy_blocks([cache], mapping)
        else:
            be.swap_blocks(before.clone(), cache, mapping)
    if name == "riscv_rvv":  # cpu_amx moves blocks with native's torch ops
        _says(name, err, "block copy", NB)
    changed = set((cache != before).flatten(2).any(-1).any(0).nonzero().flatten().tolist())
    assert changed <= {1}


@pytest.mark.parametrize("name", BACKENDS)
def test_moe_router_wider_than_the_experts(name):
    """Expert ids come from the router's columns: a router wider than w13 / w2 is refused."""
    be = _be(name)
    e, h, inter = 4, 32, 16
    g = torch.Generator().manual_seed(6)
    w13 = be.pack_weight(torch.randn(e, 2 * inter, h, generator=g) * 0.1)
    w2 = be.pack_weight(torch.randn(e, h, inter, generator=g) * 0.1)
    x = torch.randn(2, h, generator=g)
    logits = torch.zeros(2, e + 2)
    logits[:, e + 1] = 10.0  # expert e + 1 wins
    with pytest.raises(_errors(name)) as err:
        be.moe(x, logits, w13, w2, MoeSpec(top_k=2))
    _says(name, err, "moe", e)


@pytest.mark.skipif("cpu_amx" not in BACKENDS, reason="cpu_amx does not run here")
def test_cpu_amx_graph_replay_still_checks():
    """A captured step replays its C calls with the capture's pointers: the kernels' checks
    run at every replay, so a bad index written into the captured buffers stops the replay
    (graph.py's error names the kernel) and writes nothing out of range."""
    be = hal.create("cpu_amx")
    if not be.graphs_on:
        pytest.skip("HALSERVE_CPU_GRAPHS=0")
    cs = _rope(64)
    cache = _cache(torch.float32)
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(1, HQ, D, generator=g), torch.randn(1, HK, D, generator=g), torch.randn(1, HK, D, generator=g)
    pos, slots = torch.tensor([5]), torch.tensor([5])
    meta = _meta([6], [[0, 1, 2]], [1])
    meta.slot_mapping = slots

    def step():
        be.rotary_write_kv(pos, q, k, v, cs, True, cache, slots)
        return be.attention(q, cache, meta, 0.25)

    graph = be.capture_graph(step)
    assert graph is not None, be.graph_refusal
    graph.replay()
    for buf, bad in ((slots, NSLOTS), (pos, 64), (meta.block_tables, NB)):
        keep = buf.clone()
        buf.view(-1)[-1 if buf is meta.block_tables else 0] = bad
        if buf is meta.block_tables:
            meta.seq_lens[0] = 3 * BS  # reads the last column
        before = cache.clone()
        with pytest.raises((IndexError, RuntimeError), match="hs_rotary_write_kv|hs_attention|cpu_amx"):
            graph.replay()
        assert _changed_slots(before, cache) <= {5}
        buf.copy_(keep)
        meta.seq_lens[0] = 6
    graph.replay()  # good indices again: it runs
