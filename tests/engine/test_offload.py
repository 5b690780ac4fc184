"""KV offload tiers: layout probing, host and filesystem tiers (LRU, budgets, file checks,
restart), the manager's lookup/prefetch, and end to end through the engine."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from halserve.engine.offload import kvfile
from halserve.engine.offload import (
    FileSystemTier,
    HostMemoryTier,
    KVLayout,
    OffloadManager,
    block_rows,
    device_checksums,
    encode_block_file,
    payload_checksum,
)
from halserve.hal.native import NativeBackend

BS, HK, D, L = 4, 2, 8, 3
SHAPE = (L, 2, BS, HK, D)  # canonical: [layers, k|v, block_size, kv_heads, head_dim]


class TransposedBackend(NativeBackend):
    """Native ops over a different KV layout, [2, blocks, kv_heads, block_size, head_dim],
    to prove that stored blocks do not depend on a backend's layout."""

    name = "native_kvt"

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_blocks, num_kv_heads, block_size, head_dim)

    def write_kv(self, key, value, kv_cache, slot_mapping):
        nat = kv_cache.transpose(2, 3).contiguous()
        super().write_kv(key, value, nat, slot_mapping)
        kv_cache.copy_(nat.transpose(2, 3))

    def attention(self, q, kv_cache, meta, scale, out=None):
        return super().attention(q, kv_cache.transpose(2, 3).contiguous(), meta, scale, out)


def h(i: int) -> bytes:
    return i.to_bytes(32, "little")


def block(seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).to(dtype)


def toks(i: int) -> tuple[int, ...]:
    return tuple(range(i * BS, (i + 1) * BS))


# ---- layout --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layout_probe_and_cross_backend_copy(dtype):
    nat, tr = NativeBackend(), TransposedBackend()
    a = KVLayout(nat, BS, HK, D, dtype, "cpu")
    b = KVLayout(tr, BS, HK, D, dtype, "cpu")
    assert a.identity and not b.identity
    src = [torch.randn(nat.kv_cache_shape(6, BS, HK, D)).to(dtype) for _ in range(L)]
    dst = [torch.zeros(tr.kv_cache_shape(5, BS, HK, D), dtype=dtype) for _ in range(L)]
    ma = OffloadManager(nat, a, L, b"fp")
    mb = OffloadManager(tr, b, L, b"fp")
    assert ma.fingerprint == mb.fingerprint  # the layout is not part of the key
    blocks = ma.gather(src, [4, 1])
    mb.scatter(dst, [0, 3], list(blocks))
    for layer in range(L):
        assert torch.equal(dst[layer][:, 0].transpose(1, 2), src[layer][:, 4])
        assert torch.equal(dst[layer][:, 3].transpose(1, 2), src[layer][:, 1])
    assert torch.equal(mb.gather(dst, [0, 3]), blocks)


# ---- host tier -----------------------------------------------------------------------------

def test_host_tier_lru_and_budget():
    t = HostMemoryTier(SHAPE, torch.float32, 3 * block(0).numel() * 4 + 100)
    assert t.num_slots == 3
    for i in range(3):
        t.store(h(i), block(i), toks(i))
    assert t.load(h(0))[0].equal(block(0))  # 0 is now the most recent
    t.store(h(3), block(3), toks(3))  # evicts 1, the least recently used
    assert not t.lookup(h(1)) and t.lookup(h(0)) and t.lookup(h(3))
    got, tk = t.load(h(3))
    assert got.equal(block(3)) and tk == toks(3)
    assert t.load(h(1)) is None
    s = t.stats_dict()
    assert (s["hits"], s["misses"], s["evictions"], s["blocks"]) == (2, 1, 1, 3)
    with pytest.raises(ValueError, match="kv_offload_host_bytes"):
        HostMemoryTier(SHAPE, torch.float32, 10)


def test_host_slots_pinned_are_never_reused():
    t = HostMemoryTier(SHAPE, torch.float32, 2 * block(0).numel() * 4)
    t.store(h(0), block(0), toks(0))
    t.store(h(1), block(1), toks(1))
    view, tk, slot = t.acquire(h(0))  # a view of the slot, no copy
    assert tk == toks(0) and view.data_ptr() == t.view(slot).data_ptr() and view.equal(block(0))
    t.acquire(h(1))
    t.store(h(2), block(2), toks(2))  # every slot pinned: the store is skipped, nothing is overwritten
    assert not t.lookup(h(2)) and view.equal(block(0)) and t.stats_dict()["skipped_stores"] == 1
    assert t.reserve() is None
    assert t.evict(h(0)) and not t.lookup(h(0))  # evicted while pinned: its slot stays ours
    t.store(h(3), block(3), toks(3))
    assert not t.lookup(h(3)) and view.equal(block(0))
    t.release(slot)  # the last pin: the slot is free again
    s = t.reserve()
    assert s == slot
    t.view(s).copy_(block(4))
    assert t.commit(h(4), s, toks(4)) == s  # published; the reserver still holds a pin
    assert t.load(h(4))[0].equal(block(4)) and t.stats_dict()["pinned"] == 2
    r = t.reserve()  # none free: the LRU unpinned entry's slot would go, but all are pinned
    assert r is None
    t.release(s)
    r = t.reserve()
    assert r == s and not t.lookup(h(4))  # h(4) was the LRU unpinned entry
    t.view(r).copy_(block(1))
    s1 = t.commit(h(1), r, toks(1))  # h(1) is already there: that slot is pinned instead
    assert s1 != r and t.refs[s1] == 2 and t.stats_dict()["pinned"] == 1  # acquired above, and now
    with pytest.raises(AssertionError, match="released more often"):
        t.release(r)


def test_host_acquire_run_stops_at_the_first_miss():
    t = HostMemoryTier(SHAPE, torch.float32, 4 * block(0).numel() * 4)
    for i in (0, 1, 3):
        t.store(h(i), block(i), toks(i))
    run = t.acquire_run([h(0), h(1), h(2), h(3)])
    assert [tk for _, tk, _ in run] == [toks(0), toks(1)] and run[1][0].equal(block(1))
    s = t.stats_dict()
    assert (s["hits"], s["misses"], s["pinned"]) == (2, 1, 2)
    for _, _, slot in run:
        t.release(slot)
    assert t.stats_dict()["pinned"] == 0


def test_host_buffers_come_from_the_backend():
    class PoolBackend(NativeBackend):
        name = "native_pool"
        calls = 0

        def empty_host(self, shape, dtype):
            PoolBackend.calls += 1
            return torch.empty(shape, dtype=dtype)

    t = HostMemoryTier(SHAPE, torch.float32, 2 * block(0).numel() * 4, PoolBackend())
    assert PoolBackend.calls == 1 and t.pool.shape == (SHAPE[0], 2, *SHAPE[1:])  # layer-major
    assert not HostMemoryTier(SHAPE, torch.float32, block(0).numel() * 4, NativeBackend()).pool.is_pinned()


# ---- filesystem tier ------------------------------------------------------------------------

def disk(tmp_path, fp=b"f" * 32, budget=1 << 20, dtype=torch.float32):
    return FileSystemTier(tmp_path, fp, SHAPE, dtype, budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_roundtrip_and_restart(tmp_path, dtype):
    t = disk(tmp_path, dtype=dtype)
    for i in range(4):
        t.store(h(i), block(i, dtype), toks(i))
    t.close()
    assert not list(tmp_path.rglob("*.tmp"))
    t2 = disk(tmp_path, dtype=dtype)  # a restart: the index comes from the directory
    assert len(t2) == 4
    for i in range(4):
        got, tk = t2.load(h(i))
        assert got.dtype == dtype and got.equal(block(i, dtype)) and tk == toks(i)
    assert t2.stats.hits == 4 and t2.stats.bad_files == 0
    other = disk(tmp_path, fp=b"g" * 32, dtype=dtype)  # another model: another directory
    assert len(other) == 0
    t2.close(), other.close()


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x40
    elif how == "flip-head":  # a token id in the JSON header: still valid JSON
        i = data.index(b'"tokens":[') + len(b'"tokens":[')
        data[i] = ord("9") if data[i] != ord("9") else ord("8")
    elif how == "truncate":
        data = data[: len(data) - 7]
    elif how == "magic":
        data[0] ^= 0xFF
    elif how == "longer":
        data += b"\0" * 8
    path.write_bytes(bytes(data))


def test_payload_checksum_against_python_integers():
    """The file check is sum(w_k * (2k + 1)) mod 2**64 over the payload's little-endian
    64-bit words in file order (layer by layer), also for a strided host-tier slot; it
    changes for any flipped bit and for two words swapped."""
    import random

    rng = random.Random(0)
    rows = np.frombuffer(bytes(rng.getrandbits(8) for _ in range(3 * 64)), dtype=np.uint8).reshape(3, 64).copy()
    words = [int.from_bytes(rows.tobytes()[i:i + 8], "little") for i in range(0, rows.nbytes, 8)]
    ref = sum(w * (2 * k + 1) for k, w in enumerate(words)) % 2**64
    assert payload_checksum(rows) == ref
    pool = np.zeros((3, 5, 64), dtype=np.uint8)  # layer-major, like the host tier's pool
    pool[:, 2] = rows
    assert not pool[:, 2].flags.c_contiguous and payload_checksum(pool[:, 2]) == ref
    for bit in range(0, rows.nbytes * 8, 37):
        bad = rows.copy()
        bad.reshape(-1)[bit // 8] ^= 1 << (bit % 8)
        assert payload_checksum(bad) != ref
    swapped = rows.copy().reshape(-1).view(np.uint64)
    swapped[[1, 6]] = swapped[[6, 1]]
    assert payload_checksum(swapped.view(np.uint8).reshape(3, 64)) != ref
    t = block(3, torch.bfloat16)  # a tensor's rows are its layers, without a copy
    assert block_rows(t).shape == (L, t[0].numel() * 2) and np.shares_memory(block_rows(t), t.view(torch.uint8).numpy())


@pytest.mark.parametrize("expect", [False, True], ids=["parsed", "expected-head"])
@pytest.mark.parametrize("how", ["flip", "flip-head", "truncate", "longer", "magic", "fingerprint", "empty"])
def test_bad_files_are_misses_and_removed(tmp_path, how, expect):
    """Both ways of reading a file: parsing its head, and (a caller that knows the tokens)
    comparing it with the head expected."""
    fp = b"f" * 32
    t = disk(tmp_path, fp=fp)
    t.store(h(1), block(1), toks(1))
    t.flush()
    p = t.path(h(1))
    if how == "fingerprint":  # a well-formed file with a valid checksum, for another model
        p.write_bytes(encode_block_file(b"x" * 32, h(1), block(1), toks(1)))
    elif how == "empty":
        p.write_bytes(b"")
    else:
        _corrupt(p, how)
    if expect:
        assert t.read_into(h(1), torch.empty(t.block_shape, dtype=t.dtype), expect=toks(1)) is None
    else:
        assert t.load(h(1)) is None
    assert t.stats.bad_files == 1 and not p.exists() and not t.lookup(h(1))
    t.close()


def test_read_with_expected_tokens(tmp_path):
    """The expected-head read returns the block and its tokens as the parsing read does;
    a file holding other tokens is read the parsing way and its own tokens returned."""
    t = disk(tmp_path, fp=b"f" * 32)
    t.store(h(1), block(1), toks(1))
    t.flush()
    out = torch.empty(t.block_shape, dtype=t.dtype)
    assert t.read_into(h(1), out, expect=toks(1)) == toks(1) and out.equal(block(1))
    tokens, psum = t.read_into(h(1), out, check=False, expect=toks(1))
    assert tokens == toks(1) and psum == payload_checksum(block_rows(block(1)))
    out.zero_()
    assert t.read_into(h(1), out, expect=toks(2)) == toks(1) and out.equal(block(1))
    assert t.stats.bad_files == 0 and t.stats.hits == 3
    t.close()


def test_disk_budget_holds(tmp_path):
    one = len(encode_block_file(b"f" * 32, h(0), block(0), toks(0)))
    t = disk(tmp_path, budget=int(one * 3.5))
    for i in range(10):
        t.store(h(i), block(i), toks(i))
        if i == 1:
            t.flush()
            t.load(h(0))  # 0 becomes recent: 1 goes first
    t.flush()
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.kv"))
    assert on_disk <= int(one * 3.5) and len(t) == 3 and t.used_bytes() == on_disk
    assert [t.lookup(h(i)) for i in range(10)] == [False] * 7 + [True] * 3
    assert t.stats.evictions == 7
    t.close()
    smaller = disk(tmp_path, budget=one * 2 + 64)  # a restart with a smaller budget trims at once
    assert len(smaller) == 2 and smaller.lookup(h(9)) and smaller.used_bytes() <= one * 2 + 64
    smaller.close()


# ---- manager --------------------------------------------------------------------------------

def manager(host_blocks: int, disk_dir=None, device_blocks: int = 4, async_disk: bool = True, hal=None, **kw):
    """A native-backend manager over random device caches: (manager, caches)."""
    nat = hal or NativeBackend()
    lay = KVLayout(nat, BS, HK, D, torch.float32, "cpu")
    caches = [torch.randn(nat.kv_cache_shape(device_blocks, BS, HK, D)) for _ in range(L)]
    m = OffloadManager(nat, lay, L, b"model", host_bytes=lay.numel * 2 * L * 4 * host_blocks,
                       disk_dir=None if disk_dir is None else str(disk_dir), async_disk=async_disk, **kw)
    return m, caches


READERS = pytest.mark.parametrize("procs", [True, False], ids=["processes", "threads"])


@pytest.fixture(params=["processes", "threads"])
def readers(request, monkeypatch):
    """Engine tests run with load jobs read on reader processes (the default where they
    can run) and on threads (the fallback)."""
    if request.param == "threads":
        monkeypatch.setattr(kvfile, "processes_supported", lambda: False)
    return request.param


def test_manager_write_through_lookup_and_promotion(tmp_path):
    """Without prefetch threads a lookup reads disk blocks itself (into host slots, or its
    own tensors when every slot is pinned)."""
    m, caches = manager(2, tmp_path, device_blocks=8, async_disk=False)
    m.save(caches, [(i, h(i), toks(i)) for i in range(4)])
    m.flush()
    assert len(m.host) == 2 and len(m.disk) == 4
    hashes = [h(i) for i in range(5)]  # block 4 is nowhere
    res = m.lookup(hashes, toks)
    assert [x for x, _ in res.blocks] == hashes[:4] and not res.disk and not res.pending
    ref = m.gather(caches, [0, 1, 2, 3])
    assert all(torch.equal(b, ref[i]) for i, (_, b) in enumerate(res.blocks))
    # the host kept the first two blocks (pinned views, no copy); 2 and 3 came from disk
    assert res.slots[:2] == [0, 1] and res.slots[2:] == [-1, -1]
    assert m.host.stats.hits == 2 and m.disk.stats.hits == 2 and len(m.host) == 2
    assert m.host.stats_dict()["pinned"] == 2
    m.release(res)
    assert m.host.stats_dict()["pinned"] == 0
    # with the host slots free again, a disk read lands in the host tier (LRU goes)
    m.host.clear()
    res = m.lookup(hashes, toks)
    assert len(res.blocks) == 4 and sorted(res.slots[:2]) == [0, 1] and res.slots[2:] == [-1, -1]
    assert all(torch.equal(b, ref[i]) for i, (_, b) in enumerate(res.blocks))
    assert m.host.lookup(h(0)) and m.host.lookup(h(1)) and m.host.stats.stores == 4
    m.release(res)
    # a token mismatch (a hash collision, in theory) stops the prefix
    res = m.lookup(hashes, lambda i: toks(i + 1) if i == 1 else toks(i))
    assert len(res.blocks) == 1 and m.token_mismatches == 1
    m.release(res)
    assert m.host.stats_dict()["pinned"] == 0  # the mismatched block's pin went too
    fresh = [torch.zeros_like(c) for c in caches]
    m.scatter(fresh, [5, 6], [ref[0], ref[3]])
    for c, f in zip(caches, fresh):
        assert torch.equal(f[:, 5], c[:, 0]) and torch.equal(f[:, 6], c[:, 3])
    # host hits straight from pinned slots, the copy queued: the pins go at loads_done()
    res = m.lookup(hashes[:2], toks)
    assert res.slots == [0, 1] and not res.pending
    m.scatter(fresh, [1, 2], [b for _, b in res.blocks], res.slots, wait=False)
    assert m.host.stats_dict()["pinned"] == 2
    m.loads_done()
    assert m.host.stats_dict()["pinned"] == 0
    for c, f in zip(caches, fresh):
        assert torch.equal(f[:, 1], c[:, 0]) and torch.equal(f[:, 2], c[:, 1])
    st = m.stats()
    assert st["blocks_saved"] == 4 and st["blocks_loaded"] == 4 and st["disk"]["stores"] == 4
    m.close()


def run_job(m, job, timeout: float = 10.0) -> int:
    """Step a load job the way the engine does (poll each step, wait when idle)."""
    import time

    end = time.monotonic() + timeout
    while (n := m.poll(job)) is None:
        assert time.monotonic() < end, "load job did not finish"
        m.wait_pending(0.5)
    return n


def on_readers(tmp_path, blocks: int, host_blocks: int, device_blocks: int = 8, io_threads: int = 1):
    """A manager reading on reader processes, ready: ``blocks`` blocks written to disk
    (the host tier emptied), a device cache bound, the readers started. (m, caches, dst)."""
    m, caches = manager(host_blocks, tmp_path, device_blocks=device_blocks, io_processes=True,
                        io_threads=io_threads)
    m.save(caches, [(i, h(i), toks(i)) for i in range(blocks)])
    m.flush()
    m.host.clear()
    dst = torch.zeros((L, *caches[0].shape))
    m.bind(dst)
    m.prepare([])
    return m, caches, dst


def load_all(m, caches, dst, n: int = 4) -> None:
    """A load job of blocks 0..n-1 from disk alone (host tier emptied) into device blocks
    0..n-1 of ``dst`` (zeroed first): every block arrives intact and nothing stays pinned."""
    m.host.clear()
    dst.zero_()
    res = m.lookup([h(i) for i in range(n)], toks)
    assert run_job(m, m.start_load(list(range(n)), res, toks)) == n
    m.wait_reads()
    assert m.host.stats_dict()["pinned"] == 0
    for c, d in zip(caches, dst):
        assert all(torch.equal(d[:, i], c[:, i]) for i in range(n))


@READERS
@pytest.mark.parametrize("pump_bytes", [None, 1])
def test_load_job_reads_disk_into_device_blocks(tmp_path, pump_bytes, procs, monkeypatch):
    """With async reads, a lookup names the disk part of the run and a load job reads it
    (on reader processes or threads) and fills the device blocks the request holds, host
    hits first (``pump_bytes=1``: each block read goes to the device on its own)."""
    if pump_bytes:
        monkeypatch.setattr(OffloadManager, "PUMP_BYTES", pump_bytes)
    m, caches = manager(2, tmp_path, device_blocks=8, io_processes=procs)
    assert (m._procs is not None) == procs
    m.save(caches, [(i, h(i), toks(i)) for i in range(4)])
    m.flush()
    dev = torch.zeros((L, *caches[0].shape))  # the device cache, every layer
    m.bind(dev)
    hashes = [h(i) for i in range(5)]  # block 4 is nowhere
    res = m.lookup(hashes, toks)
    assert [x for x, _ in res.blocks] == hashes[:2] and res.disk == hashes[2:4] and not res.pending
    sent = []  # the device blocks of each batch, as sent
    real = m._to_device
    monkeypatch.setattr(m, "_to_device", lambda caches, ids, *a, **k: sent.append(list(ids)) or real(caches, ids, *a, **k))
    job = m.start_load([7, 6, 5, 4], res, toks)
    assert m.lookup(hashes, toks).pending  # a request sharing the prefix waits for this job
    assert m.host.stats_dict()["pinned"] >= 2  # the host hits stay pinned until copied
    assert run_job(m, job) == 4
    assert sum(sent, []) == [7, 6, 5, 4]  # in order, each block once: a batch continues the last
    for c, d in zip(caches, dev):
        for i, b in enumerate([7, 6, 5, 4]):
            assert torch.equal(d[:, b], c[:, i])
    assert m.host.stats_dict()["pinned"] == 0 and m.disk.stats.hits == 2 and not m._jobs
    assert m.stats()["load_jobs"] == 1 and m.stats()["blocks_loaded"] == 4
    assert m.stats()["load_jobs_done"] == 1 and m.stats()["load_job_seconds"] > 0
    # the disk reads landed in the host tier; a token mismatch stops the prefix at block 2
    m.host.clear()
    res = m.lookup(hashes, toks)
    assert not res.blocks and res.disk == hashes[:4]
    job = m.start_load([0, 1, 2, 3], res, lambda i: toks(i + 1) if i == 2 else toks(i))
    assert run_job(m, job) == 2 and m.token_mismatches == 1
    m.wait_reads()
    assert m.host.stats_dict()["pinned"] == 0
    # a file whose tokens are not the prompt's goes (else the next lookup would load it again)
    assert not m.disk.lookup(h(2)) and m.disk.stats.bad_files == 1
    m.save(caches, [(2, h(2), toks(2))])
    m.flush()
    # a job dropped part-way (its request aborted) lets everything go
    m.host.clear()
    res = m.lookup(hashes, toks)
    assert res.disk == hashes[:4]
    job = m.start_load([0, 1, 2, 3], res, toks)
    m.cancel(job)
    m.wait_reads()
    assert m.host.stats_dict()["pinned"] == 0 and not m._jobs and not m._job_hashes
    m.close()


@READERS
def test_unreadable_file_is_a_miss_not_a_stall(tmp_path, procs):
    m, caches = manager(4, tmp_path, io_processes=procs)
    m.save(caches, [(i, h(i), toks(i)) for i in range(2)])
    m.flush()
    m.host.clear()
    dst = torch.zeros((L, *caches[0].shape))
    m.bind(dst)
    for i in range(2):  # a directory where each file was: opened, then every read fails (EISDIR)
        p = m.disk.path(h(i))
        p.unlink()
        p.mkdir()
    res = m.lookup([h(0), h(1)], toks)
    assert res.disk == [h(0), h(1)]
    job = m.start_load([0, 1], res, toks)
    assert run_job(m, job) == 0  # the read failed: a miss, recomputed
    m.wait_reads()  # a read still running after the job ended lets its slot go itself
    st = m.stats()
    assert st["host"]["pinned"] == 0 and st["disk"]["bad_files"] >= 1 and not m.disk.lookup(h(0))
    m.close()


def test_a_read_task_that_fails_still_ends_the_job(tmp_path, monkeypatch):
    """An error a read task does not expect (here: posting a block's result) fails the
    rest of its blocks instead of leaving the job waiting for them; no slot stays pinned."""
    monkeypatch.setattr(OffloadManager, "READ_RUN", 2)
    m, caches = manager(6, tmp_path, device_blocks=8, io_processes=False)
    m.save(caches, [(i, h(i), toks(i)) for i in range(4)])
    m.flush()
    m.host.clear()
    dst = torch.zeros((L, *caches[0].shape))
    m.bind(dst)
    real = m._read_block

    def flaky(job, i):
        if i == 2:
            raise RuntimeError("boom")
        real(job, i)

    monkeypatch.setattr(m, "_read_block", flaky)
    res = m.lookup([h(i) for i in range(4)], toks)
    job = m.start_load([0, 1, 2, 3], res, toks)
    assert run_job(m, job) == 2  # blocks 0 and 1 loaded; 2 and 3 (the failed task) are not
    m.wait_reads()
    for c, d in zip(caches, dst):
        assert torch.equal(d[:, 0], c[:, 0]) and torch.equal(d[:, 1], c[:, 1])
    assert m.host.stats_dict()["pinned"] == 0
    m.close()


def test_a_reader_process_that_dies_still_ends_the_job(tmp_path, monkeypatch):
    """A reader process that dies in the middle of a job has the blocks it owed read again
    on threads: the job still loads them all, no file is counted bad or forgotten, and
    nothing stays pinned; the next job has it started again (as it has a reader found dead
    while idle)."""
    import signal

    monkeypatch.setattr(OffloadManager, "READ_RUN", 1)
    m, caches, dst = on_readers(tmp_path, 4, 6, io_threads=2)

    victim = m._procs.procs[1]  # blocks 1 and 3 are dealt to it
    os.kill(victim.pid, signal.SIGSTOP)  # it takes its share of the job, but never reads it ...
    res = m.lookup([h(i) for i in range(4)], toks)
    job = m.start_load([0, 1, 2, 3], res, toks)
    victim.kill()  # ... and dies
    victim.wait()
    assert run_job(m, job) == 4
    m.wait_reads()
    assert m.host.stats_dict()["pinned"] == 0 and m.stats()["disk"]["bad_files"] == 0
    assert all(m.disk.lookup(h(i)) for i in range(4))
    for c, d in zip(caches, dst):
        assert all(torch.equal(d[:, i], c[:, i]) for i in range(4))
    load_all(m, caches, dst)
    assert m._procs.restarts == 1
    m._procs.procs[0].kill()  # dead while idle: found out before the next job is dealt
    m._procs.procs[0].wait()
    load_all(m, caches, dst)
    assert m._procs.restarts == 2
    m.close()


def test_a_block_the_engine_fails_to_take_in_is_a_miss(tmp_path, monkeypatch):
    """Whatever goes wrong taking in a reader process's answer (here: counting a hit raises
    for block 2), that block is a miss, the job still ends, nothing stays pinned; and a bad
    file that cannot be removed (a read-only directory, say) is still a miss."""
    import pathlib

    m, caches, dst = on_readers(tmp_path, 4, 6, io_threads=2)
    real = m.disk.read_hit

    def flaky(x, size, seconds):
        if x == h(2):
            raise RuntimeError("boom")
        real(x, size, seconds)

    monkeypatch.setattr(m.disk, "read_hit", flaky)
    res = m.lookup([h(i) for i in range(4)], toks)
    assert run_job(m, m.start_load([0, 1, 2, 3], res, toks)) == 2
    m.wait_reads()
    assert m.host.stats_dict()["pinned"] == 0
    for c, d in zip(caches, dst):
        assert torch.equal(d[:, 0], c[:, 0]) and torch.equal(d[:, 1], c[:, 1])
    monkeypatch.setattr(m.disk, "read_hit", real)
    m.host.clear()
    p = m.disk.path(h(1))
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "unlink", refuse)
    res = m.lookup([h(i) for i in range(4)], toks)
    assert run_job(m, m.start_load([0, 1, 2, 3], res, toks)) == 1
    m.wait_reads()
    assert m.host.stats_dict()["pinned"] == 0 and m.stats()["disk"]["bad_files"] == 1
    assert not m.disk.lookup(h(1)) and p.exists()  # forgotten; it could not be removed
    monkeypatch.undo()
    m.close()


def test_readers_that_cannot_be_started_again_leave_the_job_to_threads(tmp_path, monkeypatch, caplog):
    """Readers found dead when a job is dealt are started again; where that fails, the
    live ones take the job, and with none left the threads read it."""
    import subprocess

    m, caches, dst = on_readers(tmp_path, 4, 6, io_threads=2)
    procs = m._procs

    def refuse(*a, **k):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    procs.procs[0].kill()
    procs.procs[0].wait()
    load_all(m, caches, dst)  # reader 1 reads it all
    assert procs.rx[0] is None and procs.rx[1] is not None and "cannot start reader process 0" in caplog.text
    procs.procs[1].kill()
    procs.procs[1].wait()
    load_all(m, caches, dst)  # nobody left: threads
    assert "this job's disk reads run on threads" in caplog.text and m._proc_jobs == {}
    monkeypatch.undo()
    load_all(m, caches, dst)  # both started again
    assert procs.restarts == 2 and all(rx is not None for rx in procs.rx)
    m.close()


def test_a_dead_readers_job_ends_when_no_reader_can_start(tmp_path, monkeypatch):
    """Job A's blocks sit at the only reader, which dies; job B is dealt before A's answers
    are taken in, and no reader can be started: both jobs still load everything (threads
    read them), and nothing stays pinned."""
    import signal
    import subprocess

    m, caches, dst = on_readers(tmp_path, 4, 8)
    victim = m._procs.procs[0]
    os.kill(victim.pid, signal.SIGSTOP)  # takes job A's share, never answers ...
    a = m.start_load([0, 1], m.lookup([h(0), h(1)], toks), toks)
    victim.kill()  # ... and dies
    victim.wait()

    def refuse(*args, **kw):
        raise OSError(24, "Too many open files")

    def later(i):
        return toks(i + 2)

    monkeypatch.setattr(subprocess, "Popen", refuse)
    b = m.start_load([2, 3], m.lookup([h(2), h(3)], later), later)
    assert run_job(m, b) == 2 and run_job(m, a) == 2
    m.wait_reads()
    assert m.host.stats_dict()["pinned"] == 0 and m._proc_jobs == {}
    for c, d in zip(caches, dst):
        assert all(torch.equal(d[:, i], c[:, i]) for i in range(4))
    monkeypatch.undo()
    m.close()


def test_a_cancelled_jobs_answer_that_fails_lets_its_slot_go(tmp_path, monkeypatch):
    """A job cancelled while a reader holds its blocks: taking their answers in fails
    (counting the hit raises), and their host slots are still let go."""
    import signal

    m, caches, dst = on_readers(tmp_path, 2, 8)
    reader = m._procs.procs[0]
    os.kill(reader.pid, signal.SIGSTOP)
    job = m.start_load([0, 1], m.lookup([h(0), h(1)], toks), toks)
    m.cancel(job)

    def boom(*args, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(m.disk, "read_hit", boom)
    os.kill(reader.pid, signal.SIGCONT)
    m.wait_reads()
    assert m.host.stats_dict()["pinned"] == 0 and m._proc_jobs == {}
    monkeypatch.undo()
    m.close()


def test_a_full_reader_pipe_never_blocks_the_engine(tmp_path, monkeypatch):
    """With one-page pipes (what a user past the pipe quota gets), a reader stops reading
    its input while its answers are not taken in; dealing the next job to it must not wait
    for it (that would wait forever: the engine is the one to take the answers in)."""
    import threading
    import time

    n = 200  # a job's share and its answers each overflow a 4 KiB pipe
    monkeypatch.setattr(kvfile, "PIPE_BYTES", 4096)
    monkeypatch.setattr(OffloadManager, "READ_RUN", 1)
    m, caches, dst = on_readers(tmp_path, 2 * n, 2 * n, device_blocks=2 * n)
    jobs = [m.start_load(list(range(n)), m.lookup([h(i) for i in range(n)], toks), toks)]
    time.sleep(1.0)  # the reader answers until its answer pipe is full, then waits

    def later(i):  # the second job's block i is block n + i
        return toks(n + i)

    dealt = threading.Thread(target=lambda: jobs.append(
        m.start_load(list(range(n, 2 * n)), m.lookup([h(i) for i in range(n, 2 * n)], later), later)), daemon=True)
    dealt.start()
    dealt.join(10)
    if dealt.is_alive():
        m._procs.procs[0].kill()  # free the stuck thread before failing
        pytest.fail("dealing a job to a reader with a full pipe blocked the engine")
    assert [run_job(m, j, timeout=60) for j in jobs] == [n, n]
    m.wait_reads()
    assert m.host.stats_dict()["pinned"] == 0 and m._procs.restarts == 0
    for c, d in zip(caches, dst):
        assert torch.equal(d, c)
    m.close()


def test_write_through_lends_host_blocks_and_bounds_the_disk_queue(tmp_path):
    m, caches = manager(2, tmp_path)
    m.save(caches, [(i, h(i), toks(i)) for i in range(2)])
    m.flush()
    assert m.disk.evict(h(0))
    stores = m.host.stats.stores
    m.save(caches, [(0, h(0), toks(0))])  # only the disk lacks it: written from the host slot
    m.flush()
    assert m.disk.lookup(h(0)) and m.host.lookup(h(1)) and m.host.stats.stores == stores
    assert m.host.stats.evictions == 0 and m.stats()["host"]["pinned"] == 0
    assert torch.equal(m.disk.load(h(0))[0], m.gather(caches, [0])[0])
    m.disk.MAX_QUEUED_BYTES = 0  # the writer is "behind": new writes are skipped, not queued
    m.save(caches, [(2, h(2), toks(2))])
    m.flush()
    assert not m.disk.lookup(h(2)) and m.stats()["disk"]["skipped_writes"] == 1
    assert m.stats()["host"]["pinned"] == 0
    m.close()


# ---- through the engine ----------------------------------------------------------------------

from halserve import LLM, SamplingParams  # noqa: E402
from halserve import hal as hal_registry  # noqa: E402
from tests.helpers.checkpoints import make_checkpoint  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
LONG = [list(range(30, 130)), list(range(200, 290)) + [7] * 10]  # 100 tokens: 6 full blocks each
HOST = 1 << 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("llama", tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def reference(ckpt):
    llm = LLM(ckpt, dtype="float32", enable_prefix_caching=False)
    cache = {}

    def ref(prompts):
        key = tuple(map(tuple, prompts))
        if key not in cache:
            cache[key] = tokens_of(llm.generate(prompts, GREEDY))
        return cache[key]

    return ref


@pytest.fixture
def transposed_backend():
    hal_registry.register(TransposedBackend)
    yield TransposedBackend.name
    hal_registry._registered.pop(TransposedBackend.name, None)


def tokens_of(outs):
    return [o.outputs[0].token_ids for o in outs]


def offload_llm(ckpt, tmp_path, **kw):
    kw.setdefault("kv_offload_host_bytes", HOST)
    return LLM(ckpt, dtype="float32", kv_offload_dir=str(tmp_path), **kw)


def test_outputs_identical_with_offload_on_and_off(ckpt, reference, tmp_path):
    prompts = [LONG[0], LONG[0][:70] + [9, 8, 7], LONG[1], [5, 6, 7]]
    llm = offload_llm(ckpt, tmp_path)
    assert tokens_of(llm.generate(prompts, GREEDY)) == reference(prompts)
    assert tokens_of(llm.generate(prompts, GREEDY)) == reference(prompts)
    llm.engine.connector.manager.flush()
    m = llm.get_metrics()["offload"]
    assert m["blocks_saved"] >= 12 and m["disk"]["stores"] == m["blocks_saved"]
    assert m["bad_files"] == 0


def test_write_through_runs_after_the_outputs(ckpt, reference, tmp_path):
    """A step's outputs do not wait for its write-through: it runs before the next step
    (which may reuse the blocks) or at a flush, with the KV the blocks were committed with."""
    llm = offload_llm(ckpt, tmp_path, num_gpu_blocks_override=8)  # a prompt takes 7 blocks
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)  # a single step
    assert tokens_of(llm.generate([LONG[0]], one)) == [reference([LONG[0]])[0][:1]]
    assert llm.get_metrics()["offload"]["blocks_saved"] == 0
    # the next prompt takes over those device blocks and writes its KV into them: the
    # queued write-through must have copied them off first
    assert tokens_of(llm.generate([LONG[1]], one)) == [reference([LONG[1]])[0][:1]]
    llm.engine.connector.manager.flush()
    assert llm.get_metrics()["offload"]["blocks_saved"] == 12
    llm.engine.kv.reset_prefix_cache()
    out = llm.generate([LONG[0]], GREEDY)
    assert tokens_of(out) == reference([LONG[0]]) and out[0].num_cached_tokens == 96


def test_device_evicted_blocks_come_back_from_host_then_disk(ckpt, reference, tmp_path):
    llm = offload_llm(ckpt, tmp_path)
    ref = reference([LONG[0]])
    assert tokens_of(llm.generate([LONG[0]], GREEDY)) == ref
    eng = llm.engine
    eng.connector.manager.flush()
    eng.kv.reset_prefix_cache()  # the device copy is gone
    out = llm.generate([LONG[0]], GREEDY)
    assert tokens_of(out) == ref and out[0].num_cached_tokens == 96
    m = llm.get_metrics()["offload"]
    assert m["host"]["hits"] == 6 and m["disk"]["hits"] == 0 and m["blocks_loaded"] == 6
    eng.kv.reset_prefix_cache()
    eng.connector.manager.host.clear()  # and the host copy too: only the files are left
    out = llm.generate([LONG[0]], GREEDY)
    assert tokens_of(out) == ref and out[0].num_cached_tokens == 96
    m = llm.get_metrics()["offload"]
    assert m["disk"]["hits"] == 6 and m["blocks_loaded"] == 12 and m["bytes_to_device"] > 0


def test_device_pressure_evicts_then_host_serves(ckpt, reference, tmp_path):
    # 10 device blocks: the second long prompt pushes the first one's blocks out
    llm = offload_llm(ckpt, tmp_path, num_gpu_blocks_override=10)
    for p in (LONG[0], LONG[1], LONG[0]):
        out = llm.generate([p], GREEDY)
        assert tokens_of(out) == reference([p])
    # blocks 0-2 stayed on the device (tails are evicted first), 3-5 came back from host
    assert out[0].num_cached_tokens == 96 and llm.get_metrics()["offload"]["host"]["hits"] == 3


def test_restart_serves_from_disk(ckpt, reference, tmp_path, readers):
    first = offload_llm(ckpt, tmp_path, kv_offload_host_bytes=0)
    assert tokens_of(first.generate(LONG, GREEDY)) == reference(LONG)
    first.engine.connector.manager.flush()
    again = offload_llm(ckpt, tmp_path, kv_offload_host_bytes=0)  # a new process, in effect
    out = again.generate(LONG, GREEDY)
    assert tokens_of(out) == reference(LONG)
    assert [o.num_cached_tokens for o in out] == [96, 96]
    m = again.get_metrics()["offload"]
    assert m["disk"]["hits"] == 12 and m["load_jobs"] >= 1  # read off the engine thread


def test_cross_backend_layouts_share_files(ckpt, reference, tmp_path, transposed_backend):
    native = offload_llm(ckpt, tmp_path, backend="native")
    assert tokens_of(native.generate(LONG, GREEDY)) == reference(LONG)
    native.engine.connector.manager.flush()
    other = offload_llm(ckpt, tmp_path, backend=transposed_backend)
    assert not other.engine.connector.manager.layout.identity
    out = other.generate(LONG, GREEDY)
    assert tokens_of(out) == reference(LONG) and [o.num_cached_tokens for o in out] == [96, 96]
    assert other.get_metrics()["offload"]["disk"]["hits"] == 12
    # and back: the transposed backend's write-through loads on native
    other.generate([LONG[0][:50] + [1, 2, 3]], GREEDY)
    other.engine.connector.manager.flush()
    again = offload_llm(ckpt, tmp_path, backend="native", kv_offload_host_bytes=0)
    p = [LONG[0][:50] + [1, 2, 3]]
    assert tokens_of(again.generate(p, GREEDY)) == reference(p)


def test_corrupt_files_are_recomputed_and_counted(ckpt, reference, tmp_path, readers):
    prompts = [LONG[0], LONG[1], list(range(300, 340))]
    first = offload_llm(ckpt, tmp_path, kv_offload_host_bytes=0)
    assert tokens_of(first.generate(prompts, GREEDY)) == reference(prompts)
    off = first.engine.connector.manager
    off.flush()
    seqs_hashes = []
    for p in prompts:  # each prompt's first block, damaged a different way
        from halserve.engine.kv_cache import ROOT_HASH, block_hash

        seqs_hashes.append(block_hash(ROOT_HASH, p[:16], first.engine.kv.fingerprint))
    _corrupt(off.disk.path(seqs_hashes[0]), "flip")
    _corrupt(off.disk.path(seqs_hashes[1]), "truncate")
    wrong = encode_block_file(b"x" * 32, seqs_hashes[2], torch.zeros(off.block_shape), tuple(prompts[2][:16]))
    off.disk.path(seqs_hashes[2]).write_bytes(wrong)
    again = offload_llm(ckpt, tmp_path, kv_offload_host_bytes=0)
    out = again.generate(prompts, GREEDY)
    assert tokens_of(out) == reference(prompts)
    assert [o.num_cached_tokens for o in out] == [0, 0, 0]
    m = again.get_metrics()["offload"]
    assert m["bad_files"] == 3 and m["disk"]["bad_files"] == 3
    again.engine.connector.manager.flush()  # recomputed blocks are written again, whole
    assert all(again.engine.connector.manager.disk.path(h).exists() for h in seqs_hashes)
    third = offload_llm(ckpt, tmp_path, kv_offload_host_bytes=0)
    out = third.generate(prompts, GREEDY)
    assert tokens_of(out) == reference(prompts) and [o.num_cached_tokens for o in out] == [96, 96, 32]


def test_concurrent_requests_sharing_prefixes(ckpt, reference, tmp_path, readers):
    shared = list(range(40, 104))  # 4 full blocks
    prompts = [shared + [i, i + 1, i + 2] for i in range(6)] + [shared[:40] + [9] * 30]
    warm = offload_llm(ckpt, tmp_path, kv_offload_host_bytes=0)
    warm.generate([shared + [500]], GREEDY)
    warm.engine.connector.manager.flush()
    llm = offload_llm(ckpt, tmp_path, max_num_batched_tokens=32)  # chunked, interleaved
    out = llm.generate(prompts, GREEDY)
    assert tokens_of(out) == reference(prompts)
    assert out[0].num_cached_tokens == 64
    m = llm.get_metrics()["offload"]
    assert m["disk"]["hits"] >= 4 and m["bad_files"] == 0


def test_disk_budget_holds_under_the_engine(ckpt, tmp_path):
    probe = offload_llm(ckpt, tmp_path / "probe", kv_offload_host_bytes=0)
    probe.generate([LONG[0]], GREEDY)
    probe.engine.connector.manager.flush()
    one = max(p.stat().st_size for p in (tmp_path / "probe").rglob("*.kv"))
    budget = one * 8
    llm = offload_llm(ckpt, tmp_path / "d", kv_offload_disk_bytes=budget)
    for k in range(4):
        llm.generate([[k + 10] * 3 + list(range(100 + k, 180 + k))], GREEDY)
    llm.engine.connector.manager.flush()
    files = list((tmp_path / "d").rglob("*.kv"))
    assert sum(p.stat().st_size for p in files) <= budget and len(files) == 8
    m = llm.get_metrics()["offload"]["disk"]
    assert m["evictions"] > 0 and m["used_bytes"] <= budget


def test_disk_reads_do_not_stall_running_requests(ckpt, reference, tmp_path, readers):
    warm = offload_llm(ckpt, tmp_path, kv_offload_host_bytes=0)
    warm.generate([LONG[0]], GREEDY)
    warm.engine.connector.manager.flush()
    llm = offload_llm(ckpt, tmp_path, kv_offload_host_bytes=0)
    eng = llm.engine
    eng.add_request("a", [3, 4, 5], GREEDY)
    eng.step()  # a's prefill
    eng.add_request("b", LONG[0], GREEDY)
    outs = {o.request_id: o for o in eng.step()}  # b's blocks are being read: a decodes alone
    assert len(outs["a"].outputs[0].token_ids) == 2 and "b" not in outs
    assert [s.request_id for s in eng.scheduler.loading] == ["b"]
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert tokens_of([done["a"], done["b"]]) == reference([[3, 4, 5], LONG[0]])
    assert done["b"].num_cached_tokens == 96


class DeferredCopyBackend(NativeBackend):
    """Native ops, but ``swap_blocks`` queued under ``copy_stream(lane)`` runs only when
    someone waits for it: the forward, on a layer's event (``kv_connector.LayerWaits``),
    another lane, on an event of this lane, or ``synchronize``. Each lane is its own queue,
    as each copy stream is. A forward that read a layer before waiting for it would see stale
    KV; a staging buffer refilled before the move out of it ran would be moved with the
    wrong blocks. ``graphs``: also 'capture' steps (replayed by calling them again)."""

    name = "test_deferred_copies"
    graphs = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.queues: dict[int, list] = {}
        self.done: dict[int, int] = {}
        self.lane: int | None = None
        self.issued = self.deferred_waits = 0

    @classmethod
    def probe(cls):
        from halserve.hal.interface import ProbeResult

        return ProbeResult(0, "test backend: only when forced")

    @classmethod
    def interpreter_ok(cls) -> bool:
        return True

    @property
    def capabilities(self):
        from halserve.hal.interface import Capabilities

        return Capabilities(graphs=self.graphs)

    def capture_graph(self, fn, *args):
        if not self.graphs:
            return None

        class Replay:
            def replay(self):
                return fn(*args)

        return Replay()

    def copy_stream(self, lane: int = 0):
        import contextlib

        @contextlib.contextmanager
        def side():
            self.lane = lane
            try:
                yield
            finally:
                self.lane = None

        return side()

    def swap_blocks(self, src, dst, block_mapping):
        if self.lane is None:
            return super().swap_blocks(src, dst, block_mapping)
        m = block_mapping.clone()  # src is read when the move runs, as a device would
        self.queues.setdefault(self.lane, []).append(lambda: NativeBackend.swap_blocks(self, src, dst, m))
        self.issued += 1

    def run_until(self, lane: int, n: int, compute: bool = False) -> None:
        q = self.queues.get(lane, [])
        done = self.done.get(lane, 0)
        if done < n and compute:
            self.deferred_waits += 1
        while done < n:
            q.pop(0)()
            done += 1
        self.done[lane] = done

    def synchronize(self):
        for lane, q in self.queues.items():
            self.run_until(lane, self.done.get(lane, 0) + len(q))

    def event(self):
        hal = self

        class Event:
            lane, at = 0, 0

            def record(self):
                self.lane = hal.lane
                self.at = hal.done.get(self.lane, 0) + len(hal.queues.get(self.lane, []))

            def wait(self):  # the waiting stream goes on once the event's lane got there
                if self.lane is not None and self.lane != hal.lane:
                    hal.run_until(self.lane, self.at, compute=hal.lane is None)

            def query(self):  # asked from the host: the device gets there meanwhile
                if self.lane is not None:
                    hal.run_until(self.lane, self.at)
                return True

        return Event()


@pytest.mark.parametrize("graphs,stage_blocks,tail", [(False, None, 3), (True, None, 3), (False, 1, 3),
                                                     (True, 1, 3), (True, None, 1)],
                         ids=["eager", "tail-graph", "block-a-chunk", "tail-graph-block-a-chunk", "decode-graph"])
def test_host_hit_loads_layer_by_layer_beside_the_forward(ckpt, reference, tmp_path, graphs, stage_blocks, tail,
                                                          monkeypatch):
    """Loads queued on the copy streams, each layer waited for by the forward just before
    it runs that layer: the tokens match, and the forward did wait on copies in flight.
    ``stage_blocks=1``: staging holds one block, so each layer is copied in 6 pieces through
    the two staging buffers in turn. A one-token tail runs as a decode graph, which has no
    per-layer waits: it waits for the whole load."""
    monkeypatch.setattr(DeferredCopyBackend, "graphs", graphs)
    if stage_blocks:
        monkeypatch.setattr(OffloadManager, "STAGE_BYTES", 1)
    hal_registry.register(DeferredCopyBackend)
    try:
        llm = LLM(ckpt, dtype="float32", kv_offload_host_bytes=HOST, backend=DeferredCopyBackend.name,
                  enforce_eager=not graphs)
        hal = llm.engine.hal
        assert bool(llm.engine.runner.tail_graphs) == graphs
        p = [LONG[0][:96] + [3, 1, 4][:tail]]  # 6 full blocks, then the tail
        ref = reference(p)
        assert tokens_of(llm.generate(p, GREEDY)) == ref
        llm.engine.kv.reset_prefix_cache()
        out = llm.generate(p, GREEDY)
        assert tokens_of(out) == ref and out[0].num_cached_tokens == 96
        layers = llm.engine.model_config.num_layers
        assert hal.issued == layers * (6 if stage_blocks else 1)
        # one wait a layer, in order; with one block a piece the two staging buffers hold the
        # copies back (a refill waits for the move out), so only the last layer's is in flight
        assert hal.deferred_waits == (1 if tail == 1 or stage_blocks else layers)
    finally:
        hal_registry._registered.pop(DeferredCopyBackend.name, None)


def test_pending_write_through_does_not_keep_a_dropped_engine(ckpt, tmp_path):
    import gc
    import weakref

    llm = offload_llm(ckpt, tmp_path)
    llm.generate([LONG[0]], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    assert llm.engine.connector.manager._unsaved  # queued, not yet written
    cache = weakref.ref(llm.engine.runner.kv_caches[0])
    del llm
    gc.collect()
    assert cache() is None


@pytest.mark.parametrize("pump_bytes,check_bytes", [(None, None), (1, None), (None, 1)],
                         ids=["one-batch", "block-a-batch", "block-a-check"])
def test_disk_hit_loads_on_the_copy_streams(ckpt, reference, tmp_path, pump_bytes, check_bytes, monkeypatch):
    """A restarted engine's disk hit goes through a load job: reads on the prefetch threads,
    copies on the copy streams (deferred until waited for, as a device would run them), the
    request admitted only once the job's copies are done; the tokens match. ``check_bytes=1``:
    the device checks a batch one block at a time."""
    if pump_bytes:
        monkeypatch.setattr(OffloadManager, "PUMP_BYTES", pump_bytes)
    if check_bytes:
        monkeypatch.setattr(OffloadManager, "CHECK_BYTES", check_bytes)
    warm = offload_llm(ckpt, tmp_path)
    warm.generate([LONG[0]], GREEDY)
    warm.engine.connector.manager.flush()
    hal_registry.register(DeferredCopyBackend)
    try:
        llm = offload_llm(ckpt, tmp_path, backend=DeferredCopyBackend.name, enforce_eager=True)
        out = llm.generate([LONG[0]], GREEDY)
        assert tokens_of(out) == reference([LONG[0]]) and out[0].num_cached_tokens == 96
        st = llm.engine.connector.manager.stats()
        assert st["load_jobs"] == 1 and st["disk"]["hits"] == 6 and st["blocks_loaded"] == 6
        layers = llm.engine.model_config.num_layers
        hal = llm.engine.hal
        assert hal.issued >= layers and hal.issued % layers == 0  # a move a layer for each batch
        assert st["host"]["pinned"] == 0
    finally:
        hal_registry._registered.pop(DeferredCopyBackend.name, None)


def test_abort_while_loading_lets_everything_go(ckpt, reference, tmp_path, readers):
    warm = offload_llm(ckpt, tmp_path)
    warm.generate([LONG[0]], GREEDY)
    warm.engine.connector.manager.flush()
    llm = offload_llm(ckpt, tmp_path, kv_offload_host_bytes=0)
    eng = llm.engine
    free = eng.kv.num_free_blocks
    eng.add_request("b", LONG[0], GREEDY)
    eng.step()
    assert [s.request_id for s in eng.scheduler.loading] == ["b"]
    job = eng.connector._jobs[eng.scheduler.loading[0].seq_id][1]
    assert eng.kv.num_free_blocks == free - 6
    eng.abort_request("b")
    eng.connector.manager.wait_reads()
    assert not eng.scheduler.loading and not eng.connector.manager._jobs and eng.kv.num_free_blocks == free
    assert eng.connector.manager.stats()["host"]["pinned"] == 0
    assert tokens_of(llm.generate([LONG[0]], GREEDY)) == reference([LONG[0]])  # and it loads again


def test_disk_hit_with_a_damaged_payload_is_caught_on_the_device(ckpt, reference, tmp_path, readers):
    """Where copies run on copy streams, the reader threads check only the head and the
    device checks the payload after the copy: a flipped payload byte in the third block is
    caught there before the request runs; the prefix stops at it, the file goes, counted."""
    warm = offload_llm(ckpt, tmp_path)
    warm.generate([LONG[0]], GREEDY)
    warm.engine.connector.manager.flush()
    from halserve.engine.kv_cache import ROOT_HASH, chain_hashes

    hashes = chain_hashes(ROOT_HASH, LONG[0][:96], 16, warm.engine.kv.fingerprint)
    path = warm.engine.connector.manager.disk.path(hashes[2])
    _corrupt(path, "flip")
    hal_registry.register(DeferredCopyBackend)
    try:
        llm = offload_llm(ckpt, tmp_path, backend=DeferredCopyBackend.name, enforce_eager=True)
        assert llm.engine.connector.manager.device_check
        out = llm.generate([LONG[0]], GREEDY)
        assert tokens_of(out) == reference([LONG[0]]) and out[0].num_cached_tokens == 32
        llm.engine.connector.manager.wait_reads()  # reads that came back after the job ended
        st = llm.engine.connector.manager.stats()
        assert st["disk"]["bad_files"] == 1 and st["load_jobs"] == 1 and st["host"]["pinned"] == 0
        llm.engine.connector.manager.flush()  # the recomputed block was written again, whole
        assert llm.engine.connector.manager.disk.read_into(hashes[2], torch.empty(llm.engine.connector.manager.block_shape)) is not None
    finally:
        hal_registry._registered.pop(DeferredCopyBackend.name, None)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device_payload_check_matches_the_file_checksum(device, tmp_path):
    """The device's check (int64 multiply-adds that wrap) gives ``payload_checksum``'s bits."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    m, _ = manager(1)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(-2**62, 2**62, (5, m.block_bytes // 8), generator=g, dtype=torch.int64)
    blocks[0] = -1  # every bit set: the largest words
    rows = blocks.view(torch.uint8).view(5, L, -1).numpy()
    want = [payload_checksum(r) for r in rows]
    words = blocks.view(5, L, -1).transpose(0, 1).to(device)  # [layers, blocks, words], as the job's buffer
    got = device_checksums(words, m._device_weights(torch.device(device))).tolist()
    assert [x % 2**64 for x in got] == want
    m.close()


def test_readers_that_cannot_start_leave_the_reads_to_threads(tmp_path, monkeypatch, caplog):
    """Reader processes that exit at once (here: no Python to run them) are found out at
    start-up (as they start, or as ``prepare`` waits for them), and the disk reads run on
    threads instead."""
    import sys

    monkeypatch.setattr(sys, "executable", "/bin/false")
    m, caches = manager(4, tmp_path, device_blocks=8, io_processes=True)
    m.save(caches, [(i, h(i), toks(i)) for i in range(3)])
    m.flush()
    m.host.clear()
    dst = torch.zeros((L, *caches[0].shape))
    m.bind(dst)
    m.prepare(list(range(8)))
    assert m._procs is None and "disk reads run on threads" in caplog.text
    res = m.lookup([h(i) for i in range(3)], toks)
    assert run_job(m, m.start_load([0, 1, 2], res, toks)) == 3
    for c, d in zip(caches, dst):
        assert all(torch.equal(d[:, i], c[:, i]) for i in range(3))
    m.close()


def test_prepare_sends_a_checked_batch_of_zeros(tmp_path, monkeypatch, caplog):
    """At start-up a batch of zero blocks goes the load job's way into free device blocks,
    checked on the device; a check that disagrees with the host's is reported."""
    m, caches = manager(4, tmp_path, device_blocks=8, hal=DeferredCopyBackend())
    assert m.device_check
    dev = torch.randn((L, *caches[0].shape))
    before = dev.clone()
    m.bind(dev)
    m.prepare([0, 1, 2])
    assert not dev[:, :, :3].any() and torch.equal(dev[:, :, 3:], before[:, :, 3:])
    assert m.host.stats_dict()["pinned"] == 0 and "failed" not in caplog.text
    import halserve.engine.offload.loads as off

    monkeypatch.setattr(off, "device_checksums", lambda words, w: torch.ones(words.shape[1], dtype=torch.int64))
    m.prepare([0, 1, 2])
    assert "payload check of zero blocks failed" in caplog.text and m.host.stats_dict()["pinned"] == 0
    m.close()


def generate_within(llm, prompt, steps: int = 500):
    """``llm.generate([prompt], GREEDY)``, but failing (not hanging) if the request is still
    unfinished after ``steps`` engine steps (e.g. sent back to load the same blocks forever)."""
    eng = llm.engine
    eng.add_request("r", prompt, GREEDY)
    for _ in range(steps):
        for o in eng.step():
            if o.finished:
                return [o]
    raise AssertionError(f"unfinished after {steps} steps: {eng.connector.manager.stats()}")


def test_a_file_with_other_tokens_is_read_once(ckpt, reference, tmp_path, readers):
    """A well-formed file whose tokens are not the prompt's (a hash collision, in theory)
    ends the loaded prefix and goes: the request is not sent back to load it again."""
    warm = offload_llm(ckpt, tmp_path)
    warm.generate([LONG[0]], GREEDY)
    off = warm.engine.connector.manager
    off.flush()
    from halserve.engine.kv_cache import ROOT_HASH, chain_hashes

    hashes = chain_hashes(ROOT_HASH, LONG[0][:96], 16, warm.engine.kv.fingerprint)
    other = tuple(LONG[1][:16])
    off.disk.path(hashes[2]).write_bytes(encode_block_file(off.fingerprint, hashes[2], off.disk.load(hashes[2])[0], other))
    hal_registry.register(DeferredCopyBackend)
    try:
        llm = offload_llm(ckpt, tmp_path, backend=DeferredCopyBackend.name, enforce_eager=True)
        out = generate_within(llm, LONG[0])
        assert tokens_of(out) == reference([LONG[0]]) and out[0].num_cached_tokens == 32
        # reads that came back after the job ended, and the write-behind of this run's new blocks
        # (a disk store holds its host slot pinned until written: on a loaded box it is still
        # running here)
        llm.engine.connector.manager.flush()
        st = llm.engine.connector.manager.stats()
        assert st["load_jobs"] == 1 and st["token_mismatches"] == 1 and st["disk"]["bad_files"] == 1
        assert st["host"]["pinned"] == 0
    finally:
        hal_registry._registered.pop(DeferredCopyBackend.name, None)


def test_a_failed_copy_to_the_device_is_recomputed(ckpt, reference, tmp_path, monkeypatch):
    """A load job whose copy to the device raises (out of device memory, say) fails whole:
    the request recomputes its prefix, once, and nothing stays pinned."""
    warm = offload_llm(ckpt, tmp_path)
    warm.generate([LONG[0]], GREEDY)
    warm.engine.connector.manager.flush()
    hal_registry.register(DeferredCopyBackend)

    def boom(*a, **k):
        raise RuntimeError("out of device memory")

    try:
        llm = offload_llm(ckpt, tmp_path, backend=DeferredCopyBackend.name, enforce_eager=True)
        monkeypatch.setattr(llm.engine.connector.manager, "_send_checked", boom)
        out = generate_within(llm, LONG[0])
        assert tokens_of(out) == reference([LONG[0]]) and out[0].num_cached_tokens == 0
        llm.engine.connector.manager.wait_reads()  # reads that came back after the job ended
        st = llm.engine.connector.manager.stats()
        assert st["load_jobs"] == 1 and st["host"]["pinned"] == 0 and not llm.engine.connector.manager._jobs
    finally:
        hal_registry._registered.pop(DeferredCopyBackend.name, None)
