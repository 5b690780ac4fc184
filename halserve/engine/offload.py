"""KV offload tiers under the prefix cache: host memory, then the filesystem.

Every tier holds whole KV blocks keyed by their prefix-cache block hash, in one canonical,
backend-neutral layout: ``[layers, 2, block_size, kv_heads, head_dim]`` in the model dtype.
A block written by one backend (any ``kv_cache_shape`` layout) loads on another when the
model, dtype and block geometry match; the tier fingerprint says so.

- ``HostMemoryTier``: a fixed pool of host buffers (pinned where the HAL says so), LRU,
  layer-major so that the device can take a prompt's blocks a layer at a time.
- ``FileSystemTier``: one file per block under ``<dir>/<fingerprint>/``, LRU by mtime so the
  order survives restarts; a header (with a CRC32) and a payload checksum guard every
  file, writes are atomic
  (temp file + rename) and run on a background thread. A corrupt, truncated or mismatched
  file is a miss: it is removed and counted, and the block is recomputed.
- ``OffloadManager``: what the engine talks to. ``save`` copies newly committed device
  blocks down (write-through), ``lookup`` continues a device prefix hit through the tiers
  (disk reads run as a ``LoadJob`` on prefetch threads, copied to the device in batches
  as they land; the sequence waits while others keep running), and
  ``scatter`` copies found blocks into fresh device blocks through ``hal.swap_blocks``, a
  layer at a time on the HAL's copy stream, so the forward that reads them starts on
  layer 0 while the later layers are still crossing the bus.
- ``KVLayout``: converts between a backend's block layout and the canonical one. It learns
  the layout by writing known values through the backend's own ``write_kv``, so it needs no
  knowledge of any backend.
"""
from __future__ import annotations

import atexit
import functools
import heapq
import json
import logging
import math
import os
import queue
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from halserve.engine import kvfile
from halserve.engine.kvfile import (FILE_SUFFIX, MAGIC, VERSION, BadBlockFile, checksum_weights,  # noqa: F401
                                    file_head, payload_checksum)
from halserve.engine.kvfile import PREFIX as _PREFIX, TRAILER as _TRAILER

if TYPE_CHECKING:
    from halserve.hal.interface import Backend

logger = logging.getLogger("halserve")



def host_empty(hal: "Backend | None", shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A host buffer for KV transfers, allocated the way the backend wants it.

    A backend may provide ``empty_host(shape, dtype)`` (e.g. from a pinned pool), or set
    ``capabilities.pin_memory``; otherwise the buffer is ordinary pageable memory.
    """
    fn = getattr(hal, "empty_host", None)
    if fn is not None:
        return fn(shape, dtype)
    pin = bool(getattr(hal.capabilities, "pin_memory", False)) if hal is not None else False
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tier_fingerprint(model_fingerprint: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """Model identity + dtype + canonical block shape: what a stored block must match."""
    import hashlib

    h = hashlib.sha256(b"halserve-kv-tier-v3")
    h.update(model_fingerprint)
    h.update(dtype_name(dtype).encode())
    h.update(",".join(map(str, shape)).encode())
    return h.digest()


# ---- stats ---------------------------------------------------------------------------------

@dataclass(slots=True)
class TierStats:
    hits: int = 0  # blocks found and returned by load
    misses: int = 0  # blocks looked up and not found (or found bad)
    stores: int = 0  # blocks written into the tier
    evictions: int = 0  # blocks dropped for the budget
    bytes_read: int = 0
    bytes_written: int = 0
    load_seconds: float = 0.0  # time spent in load (reading, checking)
    bad_files: int = 0  # corrupt / truncated / mismatched entries removed

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


# ---- tiers ---------------------------------------------------------------------------------

class KVTier:
    """A tier of whole KV blocks in canonical layout, keyed by block hash, LRU-evicted.

    ``lookup(h)`` is a cheap membership test (no data read, no stats). ``load(h)`` returns
    ``(block, tokens)`` or None (a miss; a bad entry is removed and counted). ``store``
    keeps a copy of ``block``; ``evict`` drops one entry. Thread-safe.
    """

    name = "tier"

    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, capacity_bytes: int):
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.block_bytes = math.prod(block_shape) * torch.empty((), dtype=dtype).element_size()
        self.capacity_bytes = capacity_bytes
        self.stats = TierStats()
        self.lock = threading.RLock()

    def lookup(self, h: bytes) -> bool:
        raise NotImplementedError

    def load(self, h: bytes) -> "tuple[torch.Tensor, tuple[int, ...]] | None":
        raise NotImplementedError

    def store(self, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]) -> None:
        raise NotImplementedError

    def evict(self, h: bytes) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def stats_dict(self) -> dict[str, Any]:
        with self.lock:
            d = self.stats.as_dict()
            d["blocks"] = len(self)
            d["capacity_bytes"] = self.capacity_bytes
            d["used_bytes"] = self.used_bytes()
            return d

    def used_bytes(self) -> int:
        return len(self) * self.block_bytes

    def flush(self) -> None:
        """Wait for queued writes (a no-op for synchronous tiers)."""

    def close(self) -> None:
        self.flush()


class HostMemoryTier(KVTier):
    """Blocks in one preallocated host pool (``host_empty``: pinned where the HAL asks).

    The pool is layer-major, ``[layers, slots, ...]``: a slot is one piece per layer, and a
    run of consecutive slots is one contiguous piece per layer, so a long prompt's blocks
    go to the device a layer at a time in a few large copies. ``view(slot)`` is the block
    (a strided view), ``slot_array(slot)`` its bytes as a strided numpy array.

    Slots can be *pinned* (reference-counted): ``acquire`` hands out a view of a slot with
    no copy, ``reserve`` hands out an empty slot to fill in place (a device copy or a file
    read lands straight in it), and ``release`` drops the pin. A pinned slot is never
    reused: eviction takes the least recently used unpinned entry, and an entry evicted
    while pinned frees its slot on the last release. Free slots are handed out lowest
    first, so a prompt written through in order lands in consecutive slots and is copied
    to the device in few large transfers.
    """

    name = "host"

    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, capacity_bytes: int,
                 hal: "Backend | None" = None, shared: bool = False):
        super().__init__(block_shape, dtype, capacity_bytes)
        self.num_slots = capacity_bytes // self.block_bytes
        if self.num_slots < 1:
            raise ValueError(f"kv_offload_host_bytes={capacity_bytes} holds no KV block of "
                             f"{self.block_bytes} bytes; use at least {self.block_bytes} (or 0 to disable)")
        layers = self.block_shape[0]
        shape = (layers, self.num_slots, *self.block_shape[1:])
        self.shm_fd: int | None = None  # ``shared``: the pool's memory, for reader processes to map
        self._finalizer = None
        if shared:
            self.pool = self._shared_pool(hal, shape, dtype)
        else:
            self.pool = host_empty(hal, shape, dtype)
        self.layer_bytes = self.block_bytes // layers  # one slot's piece of one layer
        self._bytes = self.pool.view(torch.uint8).reshape(layers, self.num_slots, self.layer_bytes).numpy()
        self._views: list[torch.Tensor | None] = [None] * self.num_slots  # slot views, made once
        self._bufs: list[list | None] = [None] * self.num_slots  # slot_bufs, made once
        self.entries: OrderedDict[bytes, tuple[int, tuple[int, ...]]] = OrderedDict()  # LRU first
        self.free_slots = list(range(self.num_slots))  # a heap: lowest slot first
        self.refs = [0] * self.num_slots  # pins
        self.orphans: set[int] = set()  # pinned slots outside ``entries``: freed on the last release
        self.skipped = 0  # stores dropped because every slot was pinned

    def __len__(self) -> int:
        return len(self.entries)

    def _shared_pool(self, hal: "Backend | None", shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The pool in memory other processes can map (``shm_fd``), page-locked by the
        backend where its copies want that (``Backend.pin_host``); falls back to
        ``host_empty`` (``shm_fd`` None) if either fails."""
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            fd, mm = kvfile.shared_buffer(nbytes, "halserve-kv-host")
        except OSError as e:
            logger.warning("KV offload: no shared memory for the host tier (%s); disk reads run on threads", e)
            return host_empty(hal, shape, dtype)
        pool = torch.frombuffer(mm, dtype=torch.uint8).view(dtype).view(shape)
        unpin = None
        if hal is not None and getattr(hal.capabilities, "pin_memory", False):
            t0 = time.perf_counter()
            try:
                unpin = hal.pin_host(pool)
            except Exception as e:  # e.g. over the locked-memory limit
                logger.warning("KV offload: cannot page-lock a shared host tier (%s); "
                               "it is allocated by the backend and disk reads run on threads", e)
                del pool, mm
                os.close(fd)
                return host_empty(hal, shape, dtype)
            logger.info("KV offload: page-locked the %.2f GiB host tier in %.1f s",
                        nbytes / 2**30, time.perf_counter() - t0)
        self.shm_fd = fd
        self._finalizer = weakref.finalize(self, _free_shared, hal, unpin, fd)
        return pool

    def close(self) -> None:
        """Unpin a shared pool (after the device is done with it) and close its descriptor."""
        if self._finalizer is not None:
            self._finalizer()

    def lookup(self, h: bytes) -> bool:
        with self.lock:
            return h in self.entries

    def _take_slot(self) -> int | None:
        """A slot to write (lock held): a free one, else the LRU unpinned entry's."""
        if self.free_slots:
            return heapq.heappop(self.free_slots)
        for old, (slot, _) in self.entries.items():
            if not self.refs[slot]:
                del self.entries[old]
                self.stats.evictions += 1
                return slot
        self.skipped += 1
        return None

    def _free(self, slot: int) -> None:
        if self.refs[slot]:
            self.orphans.add(slot)
        else:
            heapq.heappush(self.free_slots, slot)

    def view(self, slot: int) -> torch.Tensor:
        """Slot ``slot`` as a block tensor (a strided view, no copy)."""
        v = self._views[slot]
        if v is None:
            v = self._views[slot] = self.pool[:, slot]
        return v

    def slot_array(self, slot: int) -> np.ndarray:
        """The slot's bytes, ``[layers, layer_bytes]`` uint8 (strided, no copy), in file order."""
        return self._bytes[:, slot]

    def slot_bufs(self, slot: int) -> list[np.ndarray]:
        """``slot_array(slot)``'s layer pieces (each contiguous), made once: what a file read
        lands in."""
        b = self._bufs[slot]
        if b is None:
            b = self._bufs[slot] = list(self._bytes[:, slot])
        return b

    def acquire(self, h: bytes) -> "tuple[torch.Tensor, tuple[int, ...], int] | None":
        """(slot view, tokens, slot) with the slot pinned until ``release(slot)``; None on a miss."""
        t0 = time.perf_counter()
        with self.lock:
            e = self.entries.get(h)
            if e is None:
                self.stats.misses += 1
                return None
            self.entries.move_to_end(h)
            slot, tokens = e
            self.refs[slot] += 1
            self.stats.hits += 1
            self.stats.bytes_read += self.block_bytes
            self.stats.load_seconds += time.perf_counter() - t0
            return self.view(slot), tokens, slot

    def acquire_run(self, hashes: list[bytes]) -> "list[tuple[torch.Tensor, tuple[int, ...], int]]":
        """``acquire`` for each of ``hashes`` up to the first miss, under one lock (a long
        prompt's blocks are found in one go); the miss, if any, is counted."""
        t0 = time.perf_counter()
        out = []
        with self.lock:
            for h in hashes:
                e = self.entries.get(h)
                if e is None:
                    self.stats.misses += 1
                    break
                self.entries.move_to_end(h)
                slot, tokens = e
                self.refs[slot] += 1
                out.append((self.view(slot), tokens, slot))
            self.stats.hits += len(out)
            self.stats.bytes_read += len(out) * self.block_bytes
            self.stats.load_seconds += time.perf_counter() - t0
        return out

    def release(self, *slots: int) -> None:
        """Drop one pin from each of ``slots``."""
        with self.lock:
            for slot in slots:
                self.refs[slot] -= 1
                assert self.refs[slot] >= 0, f"host slot {slot} released more often than pinned"
                if not self.refs[slot] and slot in self.orphans:
                    self.orphans.discard(slot)
                    heapq.heappush(self.free_slots, slot)

    def pin(self, h: bytes) -> int | None:
        """Pin ``h``'s slot (no stats, no LRU change): for lending it to a writer."""
        with self.lock:
            e = self.entries.get(h)
            if e is None:
                return None
            self.refs[e[0]] += 1
            return e[0]

    def reserve(self) -> int | None:
        """An empty slot, pinned, for the caller to fill and then ``commit`` (or ``release``
        to give it back); None when every slot is pinned."""
        with self.lock:
            slot = self._take_slot()
            if slot is not None:
                self.refs[slot] = 1
                self.orphans.add(slot)
            return slot

    def commit(self, h: bytes, slot: int, tokens: tuple[int, ...]) -> int:
        """Publish a filled reserved slot under ``h``; the caller keeps a pin on the returned
        slot. If ``h`` was stored meanwhile, that slot is pinned and returned instead."""
        with self.lock:
            e = self.entries.get(h)
            if e is not None:
                self.entries.move_to_end(h)
                self.refs[e[0]] += 1
                self.release(slot)
                return e[0]
            self.orphans.discard(slot)
            self.entries[h] = (slot, tuple(tokens))
            self.stats.stores += 1
            self.stats.bytes_written += self.block_bytes
            return slot

    def load(self, h: bytes):
        got = self.acquire(h)
        if got is None:
            return None
        view, tokens, slot = got
        try:
            return view.clone(), tokens
        finally:
            self.release(slot)

    def store(self, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]) -> None:
        with self.lock:
            if h in self.entries:
                self.entries.move_to_end(h)
                return
            slot = self._take_slot()
            if slot is None:
                return
            self.view(slot).copy_(block.reshape(self.block_shape))
            self.entries[h] = (slot, tuple(tokens))
            self.stats.stores += 1
            self.stats.bytes_written += self.block_bytes

    def evict(self, h: bytes) -> bool:
        with self.lock:
            e = self.entries.pop(h, None)
            if e is None:
                return False
            self._free(e[0])
            self.stats.evictions += 1
            return True

    def clear(self) -> None:
        with self.lock:
            for h in list(self.entries):
                self.evict(h)

    def stats_dict(self) -> dict[str, Any]:
        d = super().stats_dict()
        with self.lock:
            d["pinned"] = sum(1 for r in self.refs if r)
            d["skipped_stores"] = self.skipped
        return d


def _free_shared(hal, unpin, fd: int) -> None:
    """A shared host pool's end: the device's copies from it finish, then it is unpinned
    (the mapping itself goes with the last tensor that views it)."""
    if unpin is not None:
        try:
            hal.synchronize()
            unpin()
        except Exception:  # at exit the device may be gone already
            pass
    os.close(fd)


def block_rows(block: "torch.Tensor | np.ndarray") -> np.ndarray:
    """A host block's bytes as ``[layers, layer_bytes]`` uint8, in file order, without a copy:
    each layer's piece is contiguous (a host-tier slot is strided between layers)."""
    if isinstance(block, torch.Tensor):
        t = block.reshape(block.shape[0], -1)  # a view: each layer's piece is contiguous
        if t.stride(-1) != 1:
            t = t.contiguous()
        return t.view(torch.uint8).numpy()
    return block


def device_checksums(words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``payload_checksum`` of n blocks at once on their device: ``words`` ``[layers, n,
    words a layer]`` int64, ``weights`` ``checksum_weights`` as int64 ``[layers, 1, ...]``;
    returns ``[n]`` int64 holding the checksums' bits (multiply-adds wrap mod 2**64)."""
    return words.mul(weights).sum(dim=(0, 2))


def _trailer(head: "bytes | bytearray", rows: np.ndarray) -> bytes:
    return _TRAILER.pack(zlib.crc32(head), payload_checksum(rows))


def block_file_parts(fingerprint: bytes, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]
                     ) -> tuple[bytes, np.ndarray, bytes]:
    """A block file as (head, payload rows, trailer): magic, version and JSON header; the
    block's bytes (``block_rows``, no copy); a CRC32 of the head and the payload's
    ``payload_checksum``."""
    head = file_head(header_prefix(fingerprint, h, block.dtype, tuple(block.shape)), tokens)
    rows = block_rows(block)
    return head, rows, _trailer(head, rows)


def encode_block_file(fingerprint: bytes, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]) -> bytes:
    head, rows, trailer = block_file_parts(fingerprint, h, block.contiguous(), tokens)
    return head + rows.tobytes() + trailer


def header_parts(fingerprint: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """A block file's JSON header up to its tokens, before and after the block hash (hex):
    the one definition of the header's form, which ``block_file_parts`` writes and
    ``check_block_file`` compares without a JSON parse."""
    return (b'{"fingerprint":"%s","hash":"' % fingerprint.hex().encode(),
            b'","dtype":"%s","shape":[%s],"tokens":[' % (dtype_name(dtype).encode(), ",".join(map(str, shape)).encode()))


def header_prefix(fingerprint: bytes, h: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """``header_parts`` around the hash ``h``."""
    a, b = header_parts(fingerprint, dtype, shape)
    return a + h.hex().encode() + b


def check_block_file(head: "bytes | bytearray", rows: np.ndarray, trailer: "bytes | bytearray",
                     fingerprint: bytes, h: bytes, dtype: torch.dtype, shape: tuple[int, ...],
                     check_payload: bool = True) -> tuple[tuple[int, ...], int]:
    """Check a block file split into head / payload rows / trailer; returns the block's
    tokens and its payload checksum, or raises BadBlockFile naming the first problem.
    ``check_payload=False`` leaves the payload to the caller (checked where it is copied
    to, e.g. on the device)."""
    if len(head) < _PREFIX.size:
        raise BadBlockFile(f"truncated: {len(head)}-byte head")
    magic, version, hlen = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise BadBlockFile(f"bad magic {magic!r}")
    if version != VERSION:
        raise BadBlockFile(f"version {version}, expected {VERSION}")
    nbytes = math.prod(shape) * dtype.itemsize
    if len(head) != _PREFIX.size + hlen or rows.nbytes != nbytes or len(trailer) != _TRAILER.size:
        raise BadBlockFile(f"size {len(head) + rows.nbytes + len(trailer)} does not match header length "
                           f"{hlen} + payload {nbytes}")
    head_crc, payload_sum = _TRAILER.unpack(trailer)
    if zlib.crc32(head) != head_crc:
        raise BadBlockFile("header checksum mismatch")
    if check_payload and payload_checksum(rows) != payload_sum:
        raise BadBlockFile("payload checksum mismatch")
    raw = bytes(head[_PREFIX.size:])
    pre = header_prefix(fingerprint, h, dtype, shape)
    if raw.startswith(pre) and raw.endswith(b"]}"):  # the usual case, without a JSON parse
        body = raw[len(pre):-2]
        try:
            return (tuple(map(int, body.split(b","))) if body else ()), payload_sum
        except ValueError:
            pass  # the full parse below says what is wrong
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise BadBlockFile(f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise BadBlockFile("the header is not an object")
    if header.get("fingerprint") != fingerprint.hex():
        raise BadBlockFile("fingerprint mismatch (other model, dtype or block geometry)")
    if header.get("hash") != h.hex():
        raise BadBlockFile("block hash mismatch")
    if header.get("dtype") != dtype_name(dtype) or tuple(header.get("shape", ())) != tuple(shape):
        raise BadBlockFile(f"dtype/shape {header.get('dtype')}{header.get('shape')} != {dtype_name(dtype)}{list(shape)}")
    try:
        return tuple(int(t) for t in header.get("tokens", ())), payload_sum
    except (TypeError, ValueError):
        raise BadBlockFile("unreadable tokens in the header") from None


def decode_block_file(data: "bytes | bytearray", fingerprint: bytes, h: bytes, dtype: torch.dtype,
                      shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Parse and check a whole block file; raises BadBlockFile naming the first problem."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(data) < _PREFIX.size + nbytes + _TRAILER.size:
        raise BadBlockFile(f"truncated: {len(data)} bytes")
    if not isinstance(data, bytearray):
        data = bytearray(data)
    start, end = len(data) - nbytes - _TRAILER.size, len(data) - _TRAILER.size
    rows = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=start).reshape(shape[0], -1)
    tokens, _ = check_block_file(memoryview(data)[:start], rows, bytes(data[end:]), fingerprint, h, dtype, shape)
    block = torch.frombuffer(data, dtype=torch.uint8, offset=start, count=nbytes).view(dtype).reshape(shape)
    return block, tokens


class FileSystemTier(KVTier):
    """One file per block under ``<root>/<fingerprint[:16]>/<hash[:2]>/<hash>.kv``.

    Writes go through a background thread (``flush`` waits for them); the file index is
    rebuilt from the directory at start-up, oldest mtime first, so a restarted engine finds
    what an earlier one wrote and keeps the LRU order. ``read_into`` reads a block straight
    into a caller's buffer (one ``preadv``: head, payload, trailer) and checks it there (or
    leaves the payload check to the caller); it is thread-safe, so several reads can run
    at once.
    """

    name = "disk"
    MAX_QUEUED_BYTES = 2 << 30

    def __init__(self, root: str | os.PathLike, fingerprint: bytes, block_shape: tuple[int, ...],
                 dtype: torch.dtype, capacity_bytes: int, write_async: bool = True):
        super().__init__(block_shape, dtype, capacity_bytes)
        self.fingerprint = fingerprint
        self.dir = Path(root) / fingerprint.hex()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dir = str(self.dir)
        self.file_bytes = len(encode_block_file(fingerprint, b"\0" * 32,
                                                torch.zeros(block_shape, dtype=dtype), ()))
        self._header = header_parts(fingerprint, dtype, block_shape)
        self.index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, LRU first
        self.total_bytes = 0
        self._queued_bytes = 0  # blocks handed to the writer thread, not yet written
        self.skipped_writes = 0
        self._scan()
        self._queue: queue.Queue | None = None
        self._pending: set[bytes] = set()
        if write_async:
            self._queue = queue.Queue()
            self._writer = threading.Thread(target=self._write_loop, name="halserve-kv-disk", daemon=True)
            self._writer.start()

    def path(self, h: bytes) -> Path:
        x = h.hex()
        return self.dir / x[:2] / (x + FILE_SUFFIX)

    def _scan(self) -> None:
        found = []
        for p in self.dir.glob("*/*" + FILE_SUFFIX):
            try:
                st = p.stat()
                found.append((st.st_mtime, bytes.fromhex(p.stem), st.st_size))
            except (OSError, ValueError):
                continue
        for _mtime, h, size in sorted(found):
            self.index[h] = size
            self.total_bytes += size
        while self.total_bytes > self.capacity_bytes and self.index:  # the budget may have shrunk
            self._drop(next(iter(self.index)))
            self.stats.evictions += 1

    def __len__(self) -> int:
        return len(self.index)

    def used_bytes(self) -> int:
        return self.total_bytes

    def lookup(self, h: bytes) -> bool:
        with self.lock:
            return h in self.index

    def forget(self, h: bytes) -> None:
        """Take ``h`` out of the index (its file, if any, stays); counts a miss."""
        with self.lock:
            self.stats.misses += 1
            self._unindex(h)

    def _unindex(self, h: bytes) -> None:
        size = self.index.pop(h, None)
        if size is not None:
            self.total_bytes -= size

    def _drop(self, h: bytes) -> None:
        self._unindex(h)
        try:
            self.path(h).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # read-only directory, say: forgotten here, and rejected again if read
            logger.warning("KV offload: cannot remove block file %s: %s", self.path(h), e)

    def _read(self, path: str, rows: np.ndarray, bufs: list | None = None) -> tuple[bytearray, bytearray, int]:
        """Read file ``path`` as head | payload (straight into ``rows``, a layer a piece;
        ``bufs``: those pieces, if the caller has them) | trailer, in one call."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head_len = size - rows.nbytes - _TRAILER.size
            if not _PREFIX.size <= head_len <= 1 << 20:
                raise BadBlockFile(f"size {size} does not fit a {rows.nbytes}-byte block")
            head, trailer = bytearray(head_len), bytearray(_TRAILER.size)
            bufs = [head, *(rows if bufs is None else bufs), trailer]
            if hasattr(os, "preadv"):
                got = os.preadv(fd, bufs, 0)
            else:
                got = sum(os.readv(fd, [b]) for b in bufs)
        finally:
            os.close(fd)
        if got != size:
            raise BadBlockFile(f"truncated: read {got} of {size} bytes")
        return head, trailer, size

    def head(self, h: bytes, tokens: "tuple[int, ...] | list[int]") -> bytes:
        """The head block ``h``'s file has when it holds ``tokens``."""
        a, b = self._header
        return file_head(a + h.hex().encode() + b, tokens)

    def read_into(self, h: bytes, out: "torch.Tensor | np.ndarray", bufs: list | None = None,
                  check: bool = True, touch: bool = True, expect: "tuple[int, ...] | None" = None):
        """Read block ``h`` into ``out`` (a host tensor of the block's shape and dtype, each
        layer's piece contiguous, or those bytes as ``[layers, layer_bytes]`` uint8, e.g. a
        host-tier slot) and check it; returns its tokens, or None on a miss (a bad file is
        removed and counted). ``out`` holds garbage after a miss. Thread-safe; the read (one
        ``preadv`` straight into ``out``) and the payload check are one call each, both
        without the GIL: with a dozen threads reading, every return to Python waits for it.
        ``bufs``: ``out``'s layer pieces, made once by the caller (``slot_bufs``).
        ``check=False``: the payload is not checked here, and (tokens, the file's payload
        checksum) is returned for the caller to check it; the head always is. ``touch``:
        bump the file in the LRU order (else the caller does, ``touch_many``). ``expect``: the
        tokens the caller expects (a file holding others reads the slow way)."""
        t0 = time.perf_counter()
        path = kvfile.block_path(self._dir, h)
        rows = block_rows(out)
        try:
            fast = None if expect is None else kvfile.read_expected(
                path, self.head(h, expect), rows, rows if bufs is None else bufs, check)
            if fast is not None:
                tokens, (psum, size) = expect, fast
            else:
                head, trailer, size = self._read(path, rows, bufs)
                tokens, psum = check_block_file(head, rows, trailer, self.fingerprint, h, self.dtype,
                                                self.block_shape, check_payload=check)
        except FileNotFoundError:  # removed by another engine sharing the directory
            self.forget(h)
            return None
        except BadBlockFile as e:
            self.bad_file(h, str(e))
            return None
        except OSError as e:
            self.unreadable(h, str(e))
            return None
        self.read_hit(h, size, time.perf_counter() - t0)
        if touch:
            self._touch(path)
        return tokens if check else (tokens, psum)

    def read_hit(self, h: bytes, size: int, seconds: float) -> None:
        """Count a block read (here or by a reader process) and bump it in the LRU order."""
        with self.lock:
            if h in self.index:
                self.index.move_to_end(h)
            self.stats.hits += 1
            self.stats.bytes_read += size
            self.stats.load_seconds += seconds

    def bad_file(self, h: bytes, why: str) -> None:
        """Block ``h``'s file is damaged (``why``): a miss; it is removed and counted."""
        logger.warning("KV offload: removing bad block file %s: %s", self.path(h), why)
        with self.lock:
            self.stats.bad_files += 1
            self.stats.misses += 1
            self._drop(h)

    def unreadable(self, h: bytes, why: str) -> None:
        """Block ``h``'s file cannot be read (EIO, EACCES, ...): a miss, counted; the file is
        forgotten but kept."""
        logger.warning("KV offload: cannot read block file %s: %s", self.path(h), why)
        with self.lock:
            self.stats.bad_files += 1
        self.forget(h)

    def reject(self, h: bytes, why: str) -> None:
        """A block read unchecked (``read_into(check=False)``) failed its check elsewhere:
        the file is bad; remove and count it."""
        logger.warning("KV offload: removing bad block file %s: %s", self.path(h), why)
        with self.lock:
            self.stats.bad_files += 1
            self.stats.hits -= 1
            self.stats.misses += 1
            self._drop(h)

    def touch_many(self, hashes: list[bytes]) -> None:
        """``_touch`` for blocks read with ``touch=False``, in one go."""
        paths = [str(self.path(h)) for h in hashes]
        if self._queue is not None:
            self._queue.put(paths)
            return
        for p in paths:
            self._touch(p)

    def _touch(self, path: str) -> None:
        """Bump the file's mtime (the LRU order a restart reads back), off the read path
        when there is a writer thread: a metadata write can take longer than the read."""
        if self._queue is not None:
            self._queue.put(path)
            return
        try:
            os.utime(path)
        except OSError:
            pass

    def load(self, h: bytes):
        block = torch.empty(self.block_shape, dtype=self.dtype)
        tokens = self.read_into(h, block)
        return None if tokens is None else (block, tokens)

    def store(self, h: bytes, block: torch.Tensor, tokens: tuple[int, ...],
              release: "Callable[[], None] | None" = None) -> None:
        """Write ``block`` (queued when async). With ``release``, the block is borrowed, not
        copied: ``release()`` is called once the file is written (or skipped). A write is
        skipped when the writer is ``MAX_QUEUED_BYTES`` behind: write-through is best-effort,
        and a slow disk must not hold the host tier's slots (or memory) without bound."""
        with self.lock:
            skip = h in self.index or h in self._pending or self.file_bytes > self.capacity_bytes
            if h in self.index:
                self.index.move_to_end(h)
            if not skip and self._queue is not None and self._queued_bytes >= self.MAX_QUEUED_BYTES:
                skip = True
                self.skipped_writes += 1
            if not skip:
                self._pending.add(h)
                if self._queue is not None:
                    self._queued_bytes += self.file_bytes
        if skip:
            if release is not None:
                release()
            return
        if self._queue is None:
            self._write(h, block, tokens, release)
        else:
            if release is None:
                block = block.detach().to("cpu", copy=True)
            self._queue.put((h, block, tuple(tokens), release))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if isinstance(item, (str, list)):  # touches
                    for path in [item] if isinstance(item, str) else item:
                        try:
                            os.utime(path)
                        except OSError:
                            pass
                    continue
                self._write(*item)
            except Exception:  # a full disk must not kill the engine; the block stays uncached
                logger.exception("KV offload: writing a block file failed")
            finally:
                self._queue.task_done()

    def _write(self, h: bytes, block: torch.Tensor, tokens: tuple[int, ...],
               release: "Callable[[], None] | None" = None) -> None:
        try:
            head, rows, trailer = block_file_parts(self.fingerprint, h, block, tokens)
            size = len(head) + rows.nbytes + len(trailer)
            p = self.path(h)
            p.parent.mkdir(exist_ok=True)
            tmp = p.with_name(f"{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(head)
                for x in rows:
                    f.write(x)
                f.write(trailer)
            os.replace(tmp, p)
            with self.lock:
                self.index[h] = size
                self.total_bytes += size
                self.stats.stores += 1
                self.stats.bytes_written += size
                while self.total_bytes > self.capacity_bytes and self.index:
                    old = next(iter(self.index))
                    self._drop(old)
                    self.stats.evictions += 1
        finally:
            with self.lock:
                self._pending.discard(h)
                if self._queue is not None:
                    self._queued_bytes -= self.file_bytes
            if release is not None:
                release()

    def evict(self, h: bytes) -> bool:
        with self.lock:
            if h not in self.index:
                return False
            self._drop(h)
            self.stats.evictions += 1
            return True

    def stats_dict(self) -> dict[str, Any]:
        d = super().stats_dict()
        with self.lock:
            d["skipped_writes"] = self.skipped_writes
            d["queued_bytes"] = self._queued_bytes
        return d

    def flush(self) -> None:
        if self._queue is not None:
            self._queue.join()

    def close(self) -> None:
        if self._queue is not None:
            self.flush()
            self._queue.put(None)
            self._writer.join(timeout=10)
            self._queue = None


# ---- layout ----------------------------------------------------------------------------------

class KVLayout:
    """Maps one block of a backend's KV cache (``cache[:, block]``) to the canonical
    ``[bs, kv_heads, head_dim]`` order and back.

    The map is learned once at start-up: known values are written through the backend's
    ``write_kv`` into a one-block cache of its ``kv_cache_shape`` and read back. Values are
    base-16 digits (plus one), exact in every KV dtype down to fp8, so a few writes recover
    each element's canonical index. The native layout comes out as the identity.
    """

    def __init__(self, hal: "Backend", block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.hal = hal
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.dtype = dtype
        self.device = device
        self.canonical = (block_size, num_kv_heads, head_dim)
        self.numel = block_size * num_kv_heads * head_dim
        self.perm = self._probe()  # canonical index -> flat position within a backend block
        self.identity = bool(torch.equal(self.perm, torch.arange(self.numel)))

    def backend_shape(self, n: int) -> tuple[int, ...]:
        return tuple(self.hal.kv_cache_shape(n, self.block_size, self.num_kv_heads, self.head_dim))

    @torch.inference_mode()
    def _probe(self) -> torch.Tensor:
        shape = self.backend_shape(1)
        if shape[0] != 2 or shape[1] != 1:
            raise ValueError(f"kv_cache_shape {shape}: dim 0 must be 2 (k, v) and dim 1 the block")
        per_block = math.prod(shape[2:])
        idx = torch.arange(self.numel).reshape(self.canonical)
        digits = max(1, math.ceil(math.log(self.numel, 16))) if self.numel > 1 else 1
        slots = torch.arange(self.block_size, dtype=torch.int64, device=self.device)
        found = torch.zeros(per_block, dtype=torch.int64)
        for k in range(digits):
            cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            vals = ((idx // 16 ** k) % 16 + 1).to(self.dtype).to(self.device)
            self.hal.write_kv(vals, vals, cache, slots)
            got = cache[0, 0].reshape(-1).to("cpu", torch.float32).round().to(torch.int64)
            v = cache[1, 0].reshape(-1).to("cpu", torch.float32).round().to(torch.int64)
            if not torch.equal(got, v):
                raise ValueError(f"{self.hal.name}: write_kv stores k and v in different layouts")
            if k == 0:
                written = got > 0
            found += (got - 1).clamp(min=0) * 16 ** k
        pos = torch.nonzero(written).reshape(-1)
        canon = found[pos]
        if pos.numel() != self.numel or not torch.equal(torch.sort(canon).values, torch.arange(self.numel)):
            raise ValueError(f"{self.hal.name}: could not map kv_cache_shape {shape} to "
                             f"[block_size, kv_heads, head_dim] = {list(self.canonical)}")
        perm = torch.empty(self.numel, dtype=torch.int64)
        perm[canon] = pos
        return perm

    def to_canonical(self, staging: torch.Tensor, n: int) -> torch.Tensor:
        """Backend-layout host blocks ``[2, n, ...]`` -> ``[2, n, bs, hk, d]``."""
        flat = staging.reshape(2, n, -1)
        if not self.identity:
            flat = flat.index_select(2, self.perm)
        return flat.reshape(2, n, *self.canonical)

    def from_canonical(self, blocks: torch.Tensor, n: int) -> torch.Tensor:
        """``[2, n, bs, hk, d]`` -> backend-layout host blocks ``[2, n, ...]``."""
        staging = host_empty(self.hal, self.backend_shape(n), self.dtype)
        if self.identity:
            staging.copy_(blocks.reshape(staging.shape))
            return staging
        flat = staging.view(2, n, -1)
        flat.zero_()
        flat.index_copy_(2, self.perm, blocks.reshape(2, n, -1))
        return staging


# ---- the manager -----------------------------------------------------------------------------

@dataclass(slots=True)
class LookupResult:
    """Blocks found below the device, in prefix order: (hash, canonical host block) pairs,
    their tokens, and the host-tier slot each one lives in (pinned until the manager's
    ``scatter``, ``start_load`` or ``release``; -1: the block owns its memory).
    ``disk``: the hashes that continue the run on disk (or in the host tier) still to be
    read, by a ``start_load`` job. ``pending``: part of the prefix is being loaded for
    another request right now; ask again once that is done."""

    blocks: list[tuple[bytes, torch.Tensor]] = field(default_factory=list)
    tokens: list[tuple[int, ...]] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    disk: list[bytes] = field(default_factory=list)
    pending: bool = False


@dataclass(slots=True, eq=False)
class LoadJob:
    """Blocks below the device being brought into device blocks that a waiting request
    holds, before it runs (``OffloadManager.start_load``). Per block: ``got`` is None while
    it is being read, then (host block, tokens, host slot or -1, the file's payload
    checksum still to check on the device, or None), or False for a miss, a bad file or
    other tokens. ``end``: the usable prefix is at most this many blocks (the first
    failure so far). Blocks go to the device in order: ``got[:resolved]`` are all read
    (or failed), ``got[:sent]`` of them were sent."""

    block_ids: list[int]
    hashes: list[bytes]
    expect: list[tuple[int, ...]]
    got: list
    end: int
    sent: int = 0  # blocks handed to the device copies (got[:sent])
    uploads: list = field(default_factory=list)  # (event or None, what must outlive it, block indices, flags)
    id: int = 0
    resolved: int = 0  # got[:resolved] are all settled (read or failed)
    closed: bool = False
    failed: bool = False  # a copy to the device raised: nothing of it is used
    landing: list = field(default_factory=list)  # host slot reserved for each read, until it runs
    touched: set = field(default_factory=set)  # blocks whose files a reader process touched (LRU)
    handed: set = field(default_factory=set)  # blocks handed to a reader (process or thread), which owns their landing slot
    started: float = field(default_factory=time.perf_counter)

    def read_all(self) -> bool:
        """Every block of the usable prefix is read (or failed). Under the manager's lock."""
        while self.resolved < self.end and self.got[self.resolved] is not None:
            self.resolved += 1
        return self.resolved >= self.end


class OffloadManager:
    """Tiers in order (host, then disk) plus the device copies, for one engine.

    The fast path moves blocks between the device and pinned host-tier slots with no host
    copy in between, a layer at a time: runs of consecutive slots cross the bus in one
    copy each into a device staging buffer (at most ``STAGE_BYTES``), and ``swap_blocks``
    moves them into the layer's cache. Loads run on the HAL's copy stream and mark each
    layer done (``Backend.event``), so the forward reading them waits per layer, not for
    the whole prompt. Disk reads land straight in reserved host slots, on ``io_threads``
    threads at once, for a ``LoadJob``: the request waits holding its device blocks while
    the blocks read so far go to the device in batches of ``PUMP_BYTES`` (on the copy
    streams, beside other requests' steps), so the reads and the bus overlap; it runs once
    all are there.
    """

    STAGE_BYTES = 256 << 20  # device staging for block moves (one layer of a chunk of blocks)
    READ_RUN = 4  # blocks a read task reads in turn
    PUMP_BYTES = 96 << 20  # a load job sends what it has read to the device in batches of this
    CHECK_BYTES = 256 << 20  # at most this much of a batch at once in the device buffer it is checked in

    def __init__(self, hal: "Backend", layout: KVLayout, num_layers: int, model_fingerprint: bytes, *,
                 host_bytes: int = 0, disk_dir: str | None = None, disk_bytes: int = 16 << 30,
                 offload_generated: bool = False, async_disk: bool = True, io_threads: int | None = None,
                 io_processes: bool | None = None):
        self.hal = hal
        self.layout = layout
        self.num_layers = num_layers
        self.block_shape = (num_layers, 2, *layout.canonical)
        self.dtype = layout.dtype
        self.fingerprint = tier_fingerprint(model_fingerprint, self.dtype, self.block_shape)
        self.offload_generated = offload_generated
        self.host: HostMemoryTier | None = None
        self.disk: FileSystemTier | None = None
        # load jobs read on reader processes where they can (``kvfile``), into a host tier in shared memory
        procs = bool(disk_dir and async_disk and host_bytes and io_processes is not False
                     and kvfile.processes_supported())
        if io_processes and not procs:
            raise ValueError("KV offload: reader processes need a filesystem tier, a host tier, async disk "
                             "writes and Linux (memfd_create, preadv)")
        if host_bytes:
            self.host = HostMemoryTier(self.block_shape, self.dtype, host_bytes, hal, shared=procs)
        if disk_dir:
            self.disk = FileSystemTier(disk_dir, self.fingerprint, self.block_shape, self.dtype,
                                       disk_bytes, write_async=async_disk)
        self.tiers: list[KVTier] = [t for t in (self.host, self.disk) if t is not None]
        # reads scale to about a dozen threads (measured on a 16-core host); more starve the
        # engine thread
        self.io_threads = io_threads or min(12, os.cpu_count() or 1)
        self._prefetch = (ThreadPoolExecutor(self.io_threads, thread_name_prefix="halserve-kv-prefetch")
                          if async_disk and self.disk is not None else None)
        self._procs: kvfile.ReaderProcesses | None = None
        if procs and self.host.shm_fd is not None:
            try:
                self._procs = kvfile.ReaderProcesses(
                    self.io_threads, self.host.shm_fd, (num_layers, self.host.num_slots, self.host.layer_bytes),
                    self.disk._dir, self.disk._header, run=self.READ_RUN)
            except OSError as e:
                logger.warning("KV offload: cannot start reader processes (%s); disk reads run on threads", e)
        self._proc_jobs: dict[int, list] = {}  # job id -> [job, blocks the reader processes still owe it]
        self._proc_lock = threading.RLock()  # around dealing to the readers and taking in their answers
        self._threads_busy = 0  # read tasks queued or running on the prefetch threads
        self._jobs: list[LoadJob] = []  # load jobs not yet finished or cancelled
        self._job_hashes: dict[bytes, LoadJob] = {}  # what they are bringing in
        self._wake = _Waker()  # set by a read thread: a job has a batch to send (or is read)
        self._cache = None  # weak ref to the device KV cache, every layer (``bind``)
        self._lock = threading.Lock()
        self._loading: list[tuple[list[int], list]] = []  # scatters not yet waited for
        self._ring: list | None = None  # (copied, moved) events of the two staging buffers
        self._unsaved: list = []  # write-through queued by save_later
        self._saver = threading.current_thread()  # the thread that queued it (steps the engine)
        self.stage_blocks = max(1, self.STAGE_BYTES * num_layers // self.block_bytes)
        self.pump_blocks = max(1, self.PUMP_BYTES // self.block_bytes)
        # where the copies run beside the host (copy streams), a load job checks the payload
        # of the blocks it reads on the device, after the copy, instead of on the reader
        # threads: the reads then run at page-cache speed
        self.device_check = self.layout.identity and self.hal.event() is not None
        self._weights: dict = {}  # payload_checksum weights on the device
        # engine-side counters
        self.blocks_saved = 0
        self.blocks_loaded = 0
        self.bytes_to_device = 0
        self.bytes_from_device = 0
        self.load_seconds = 0.0  # host time to queue (or, waited, finish) the copy-ins
        self.load_count = 0  # copy-ins (one per admitted sequence that found blocks below)
        self.token_mismatches = 0
        self.lookups = 0
        self.load_jobs = 0  # admissions that waited for blocks read from disk
        self.load_jobs_done = 0  # of them, finished (not cancelled) ...
        self.load_job_seconds = 0.0  # ... and their time from start to all blocks in place

    @property
    def enabled(self) -> bool:
        return bool(self.tiers)

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * torch.empty((), dtype=self.dtype).element_size()

    # ---- device <-> host ----------------------------------------------------------------------
    def _chunks(self, block_ids: list[int], slots: list[int], device_first: bool):
        """Chunks of at most ``stage_blocks`` blocks: (offset, count, mapping between the
        device blocks and staging rows (a host tensor, pinned where the HAL pins), runs of
        consecutive host slots (start, end, first slot or -1) within the chunk)."""
        for a in range(0, len(block_ids), self.stage_blocks):
            ids = block_ids[a:a + self.stage_blocks]
            yield a, len(ids), self._mapping(ids, device_first), list(self._runs(slots[a:a + len(ids)]))

    def _mapping(self, ids: list[int], device_first: bool) -> torch.Tensor:
        """``swap_blocks``'s mapping between device blocks ``ids`` and rows 0.. of a staging
        buffer (a host tensor, pinned where the HAL pins)."""
        mapping = host_empty(self.hal, (len(ids), 2), torch.int64)
        m = mapping.numpy()
        m[:, 0 if device_first else 1] = ids
        m[:, 1 if device_first else 0] = np.arange(len(ids))
        return mapping

    @staticmethod
    def _runs(slots: list[int]):
        """(start, end, first slot) of each run of consecutive host-tier slots; a block with
        no slot (-1) is a run of its own."""
        i, n = 0, len(slots)
        while i < n:
            j = i + 1
            if slots[i] >= 0:
                while j < n and slots[j] == slots[j - 1] + 1:
                    j += 1
            yield i, j, slots[i]
            i = j

    @staticmethod
    def _host_part(blocks: list[torch.Tensor], pool: "torch.Tensor | None", i: int, j: int, slot: int,
                   layer: "int | None" = None) -> torch.Tensor:
        """Layer ``layer`` of blocks ``i:j`` in host memory, ``[j - i, 2, bs, hk, d]``; every
        layer, ``[layers, j - i, ...]``, when ``layer`` is None."""
        if slot >= 0:
            return pool[:, slot:slot + j - i] if layer is None else pool[layer, slot:slot + j - i]
        return blocks[i].unsqueeze(1) if layer is None else blocks[i][layer].unsqueeze(0)

    def _stage(self, n: int, device) -> torch.Tensor:
        """``[min(n, stage_blocks), 2, bs, hk, d]`` on the device: one layer of a chunk of
        blocks (a transient buffer, like an activation; work queued on its stream keeps it
        valid)."""
        return torch.empty((min(n, self.stage_blocks), *self.block_shape[1:]), dtype=self.dtype, device=device)

    def _to_host(self, kv_caches: list[torch.Tensor], block_ids: list[int], blocks: list[torch.Tensor],
                 slots: list[int], pool: "torch.Tensor | None") -> None:
        """Device blocks -> host blocks (canonical layout, identity backends), then sync."""
        stage = self._stage(len(block_ids), kv_caches[0].device)
        for a, m, mapping, runs in self._chunks(block_ids, slots, device_first=True):
            for layer, cache in enumerate(kv_caches):
                self.hal.swap_blocks(cache, stage[:m].transpose(0, 1), mapping)
                for i, j, slot in runs:  # the next layer's swap queues behind these copies
                    self._host_part(blocks, pool, a + i, a + j, slot, layer).copy_(stage[i:j], non_blocking=True)
        self.hal.synchronize()

    def _to_device(self, kv_caches: list[torch.Tensor], block_ids: list[int], blocks: list[torch.Tensor],
                   slots: list[int], pool: "torch.Tensor | None", events: "list | None" = None,
                   lanes: bool | None = None) -> list:
        """Host blocks (canonical layout, identity backends) -> device blocks, queued a layer
        at a time. With ``lanes`` (default: when ``events`` are given) they run on the HAL's
        copy streams, and ``events[l]`` (if given) marks layer l done; else on the current
        stream. Returns what must outlive them."""
        chunks = list(self._chunks(block_ids, slots, device_first=False))
        dev = kv_caches[0].device

        def copy_in(stage, layer, a, runs):
            for i, j, slot in runs:
                stage[i:j].copy_(self._host_part(blocks, pool, a + i, a + j, slot, layer), non_blocking=True)

        if not (events is not None if lanes is None else lanes):  # in order, on the current stream
            stage = self._stage(len(block_ids), dev)
            for layer, cache in enumerate(kv_caches):
                for a, m, mapping, runs in chunks:
                    copy_in(stage, layer, a, runs)
                    self.hal.swap_blocks(stage[:m].transpose(0, 1), cache, mapping)
            return [c[2] for c in chunks]
        # beside the forward: the bus copies one after another on lane 0, into two staging
        # buffers in turn; each moved into its layer's cache on lane 1 once copied, while the
        # next one crosses the bus (two copies at once would share the bus, not add to it)
        if self._ring is None:
            self._ring = [[self.hal.event() for _ in range(2)] for _ in range(2)]  # copied, moved
        copied, moved = self._ring
        with self.hal.copy_stream(0):
            stages = [self._stage(len(block_ids), dev) for _ in range(2)]
        piece = 0
        for layer, cache in enumerate(kv_caches):
            for c, (a, m, mapping, runs) in enumerate(chunks):
                k = piece % 2
                with self.hal.copy_stream(0):
                    if piece >= 2:
                        moved[k].wait()  # staging buffer k is free again
                    copy_in(stages[k], layer, a, runs)
                    copied[k].record()
                with self.hal.copy_stream(1):
                    copied[k].wait()
                    self.hal.swap_blocks(stages[k][:m].transpose(0, 1), cache, mapping)
                    moved[k].record()
                    if events is not None and c == len(chunks) - 1:
                        events[layer].record()  # the layer is in its cache
                piece += 1
        return [c[2] for c in chunks] + stages  # lane 1 reads the staging buffers of lane 0

    @torch.inference_mode()
    def gather(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
        """Device blocks -> canonical host blocks ``[n, layers, 2, bs, hk, d]`` (a new
        tensor, layer-major underneath: each block's layers are contiguous pieces)."""
        n = len(block_ids)
        out = torch.empty((self.num_layers, n, *self.block_shape[1:]), dtype=self.dtype)
        if self.layout.identity:
            self._to_host(kv_caches, block_ids, [], list(range(n)), out)
            return out.transpose(0, 1)
        mapping = torch.tensor([[b, i] for i, b in enumerate(block_ids)], dtype=torch.int64)
        staging = self._staging(n)
        for layer, cache in enumerate(kv_caches):
            self.hal.swap_blocks(cache, staging, mapping)
            self.hal.synchronize()
            out[layer] = self.layout.to_canonical(staging, n).transpose(0, 1)
        return out.transpose(0, 1)

    def _staging(self, n: int) -> torch.Tensor:
        """A reusable host buffer (pinned where the HAL asks) for n blocks of one layer in
        the backend's layout (non-identity layouts only)."""
        shape = self.layout.backend_shape(n)
        buf = getattr(self, "_stage_buf", None)
        if buf is None or buf.numel() < math.prod(shape):
            buf = self._stage_buf = host_empty(self.hal, (math.prod(shape),), self.dtype)
        return buf[:math.prod(shape)].view(shape)

    @torch.inference_mode()
    def scatter(self, kv_caches: list[torch.Tensor], block_ids: list[int], blocks: list[torch.Tensor],
                slots: "list[int] | None" = None, wait: bool = True, events: "list | None" = None) -> None:
        """Canonical host blocks -> the device blocks ``block_ids``. ``slots``: the host-tier
        slot of each block (from ``lookup``), released once copied; -1 or None: none.

        ``wait=False`` only queues the copies, so the host goes on launching while they run;
        the caller then calls ``loads_done()`` once the device has caught up, and the host
        blocks are released there. With ``events`` (one ``Backend.event()`` a layer) the
        copies run beside the caller's stream and ``events[l]`` marks layer l copied: work
        that reads layer l waits on it (``AttentionMetadata.layer_ready``); without, they
        are queued on the current stream, ahead of what is queued next."""
        n = len(block_ids)
        if n == 0:
            return
        slots = list(slots) if slots is not None else [-1] * n
        t0 = time.perf_counter()
        defer = not wait and self.layout.identity  # other layouts go through a reused buffer
        queued = False
        try:
            if self.layout.identity:
                keep = self._to_device(kv_caches, block_ids, blocks, slots,
                                       self.host.pool if self.host is not None else None,
                                       events if defer else None)
                if defer:  # the host memory must outlive the copies
                    self._loading.append((slots, [blocks, keep]))
                    queued = True
                else:
                    self.hal.synchronize()  # the host blocks may be reused once this returns
            else:
                mapping = torch.tensor([[i, b] for i, b in enumerate(block_ids)], dtype=torch.int64)
                for layer, cache in enumerate(kv_caches):
                    staging = self._staging(n)
                    staging.copy_(self.layout.from_canonical(torch.stack([b[layer] for b in blocks], dim=1), n))
                    self.hal.swap_blocks(staging, cache, mapping)
                    self.hal.synchronize()  # the staging buffer is reused by the next layer
        finally:
            if not queued:
                if defer:  # failed part-way: let what was queued finish first
                    self.hal.synchronize()
                self._release_slots(slots)
        self.blocks_loaded += n
        self.load_count += 1
        self.bytes_to_device += n * self.block_bytes
        self.load_seconds += time.perf_counter() - t0

    def loads_done(self) -> None:
        """After ``scatter(wait=False)``: wait for the device (a no-op when the caller has
        already synchronised) and release the host blocks."""
        if not self._loading:
            return
        self.hal.synchronize()
        loading, self._loading = self._loading, []
        for slots, _ in loading:
            self._release_slots(slots)

    def _release_slots(self, slots: list[int]) -> None:
        pinned = [s for s in slots if s >= 0]
        if pinned:
            self.host.release(*pinned)

    # ---- write-through --------------------------------------------------------------------------
    def save_later(self, kv_caches: list[torch.Tensor], blocks: list[tuple[int, bytes, tuple[int, ...]]]) -> None:
        """Queue ``save``: it runs at ``save_pending``, which the engine calls before the
        next step touches a device block (and ``flush`` calls), while the blocks still hold
        the KV they were committed with. The cache is held weakly: a dropped engine's
        pending blocks are dropped with it."""
        self._saver = threading.current_thread()
        self._unsaved.append(([weakref.ref(t) for t in kv_caches], blocks))

    def idle(self) -> None:
        """Housekeeping while the engine has nothing to step: finish the queued write-through,
        and let go the host slots of reads that came back after their job ended."""
        self.save_pending()

    def save_pending(self) -> None:
        """Run the queued write-through. Only the thread that steps the engine may: from
        another one (an exit hook while the engine thread still runs) it is left alone,
        since a step may be reusing those blocks right then. It also takes in what the
        reader processes have read meanwhile (a cancelled job's slots come back)."""
        self._collect()
        if not self._unsaved:
            return
        if self._saver is not threading.current_thread() and self._saver.is_alive():
            return
        unsaved, self._unsaved = self._unsaved, []
        for refs, blocks in unsaved:
            kv_caches = [r() for r in refs]
            if all(t is not None for t in kv_caches):
                self.save(kv_caches, blocks)

    @torch.inference_mode()
    def save(self, kv_caches: list[torch.Tensor], blocks: list[tuple[int, bytes, tuple[int, ...]]]) -> None:
        """Copy newly committed device blocks (block_id, hash, tokens) into every tier that
        lacks them. With a host tier (and a backend in the canonical layout) they are copied
        straight into reserved host slots, and the disk writer reads them from there. Disk
        writes are queued; ``flush`` waits for them."""
        todo = [(b, h, t) for b, h, t in blocks if any(not tier.lookup(h) for tier in self.tiers)]
        if not todo:
            return
        self.blocks_saved += len(todo)
        self.bytes_from_device += len(todo) * self.block_bytes
        ids = [b for b, _, _ in todo]
        if self.host is None or not self.layout.identity:
            data = self.gather(kv_caches, ids)
            for (_, h, tokens), block in zip(todo, data):
                if self.host is not None:
                    self.host.store(h, block, tokens)
                if self.disk is not None:  # ``data`` is ours alone: lend it, no copy
                    self.disk.store(h, block, tokens, release=_noop)
            return
        # blocks the host tier already has (only the disk lacks them) are lent from there
        have = [self.host.pin(h) for _, h, _ in todo]
        copy = [k for k, s in enumerate(have) if s is None]
        slots = [-1] * len(todo)
        views: list[torch.Tensor | None] = [None] * len(todo)
        try:
            for k in copy:
                s = self.host.reserve()
                slots[k] = -1 if s is None else s
                views[k] = self.host.view(s) if s is not None else torch.empty(self.block_shape, dtype=self.dtype)
            self._to_host(kv_caches, [ids[k] for k in copy], [views[k] for k in copy],
                          [slots[k] for k in copy], self.host.pool)
        except BaseException:
            self._release_slots([s for s in slots + have if s is not None])
            raise
        for k, (_, h, tokens) in enumerate(todo):
            if have[k] is not None:
                slot = have[k]
            elif slots[k] >= 0:
                slot = self.host.commit(h, slots[k], tokens)  # pinned until the disk writer is done
            else:
                slot = -1
            view = self.host.view(slot) if slot >= 0 else views[k]
            if self.disk is None:
                self._release_slots([slot])
            else:
                self.disk.store(h, view, tokens,
                                release=_noop if slot < 0 else functools.partial(self.host.release, slot))

    # ---- lookup and promotion ----------------------------------------------------------------------
    def lookup(self, hashes: list[bytes], tokens: Callable[[int], tuple[int, ...]]) -> LookupResult:
        """Continue a device prefix miss: the longest run of ``hashes`` found below the
        device, checked token for token (``tokens(i)`` gives block i's tokens).

        Host hits are returned at once, as pinned views of their slots (no copy). Where the
        run goes on below the host tier: with prefetch threads, ``disk`` lists the hashes
        that continue it, for a ``start_load`` job to read (so a disk read never stalls the
        running requests); without, they are read here, into host slots. ``pending``: a
        load job is bringing part of this prefix in right now. The caller hands the result
        to ``scatter``, ``start_load`` or ``release``."""
        res = LookupResult()
        if not self.tiers or not hashes:
            return res
        self.lookups += 1
        run: list = []  # host hits acquired ahead, in order
        host_miss = -1  # index of the block the last run stopped at (a counted host miss)
        for i, h in enumerate(hashes):
            if h in self._job_hashes:
                res.pending = True
                break
            got = None
            if run:
                got = run.pop()
            elif self.host is not None and i != host_miss:
                run = self.host.acquire_run(hashes[i:])
                host_miss = i + len(run)
                run.reverse()
                got = run.pop() if run else None
            if got is None and self.disk is not None:
                if not self.disk.lookup(h):
                    with self.disk.lock:
                        self.disk.stats.misses += 1
                elif self._prefetch is None:
                    got = self._promote(h)
                else:
                    for x in hashes[i:]:  # the run still below the device, read by a load job
                        if x in self._job_hashes or not (
                                self.disk.lookup(x) or (self.host is not None and self.host.lookup(x))):
                            break
                        res.disk.append(x)
                    break
            if got is None:
                break
            block, toks, slot = got
            if toks != tuple(tokens(i)):
                self.token_mismatches += 1
                self._release_slots([slot])
                break
            res.blocks.append((h, block))
            res.tokens.append(toks)
            res.slots.append(slot)
        self._release_slots([slot for _, _, slot in run])  # acquired past a mismatch
        if res.pending:  # come back when the other job is done; keep nothing pinned meanwhile
            self.release(res)
            res.disk = []
        return res

    def release(self, res: LookupResult) -> None:
        """Drop a lookup's blocks unused."""
        self._release_slots(res.slots)
        res.blocks, res.tokens, res.slots = [], [], []

    def _promote(self, h: bytes, slot: int | None = None, check: bool = True,
                 expect: "tuple[int, ...] | None" = None):
        """Read block ``h`` from disk: into a reserved host slot (``slot``, else one reserved
        here; published in the host tier and returned pinned), or into its own tensor when
        there is no host slot to have. A reserved slot is used or released. ``check=False``
        (a load job's read with ``device_check``): the payload is left unchecked and the
        slot stays reserved, unpublished: (view, tokens, slot, the file's payload checksum),
        for the device to check and ``_settle`` to publish. ``expect``: the tokens the
        caller expects (``FileSystemTier.read_into``)."""
        if slot is None and self.host is not None:
            slot = self.host.reserve()
        if slot is None:  # its own memory, checked here
            got = self.disk.load(h)
            return None if got is None else (got[0], got[1], -1)
        try:
            got = self.disk.read_into(h, self.host.slot_array(slot), self.host.slot_bufs(slot),
                                      check=check, touch=check, expect=expect)
        except BaseException:
            self.host.release(slot)
            raise
        if got is None:
            self.host.release(slot)
            return None
        if not check:
            return self.host.view(slot), got[0], slot, got[1]
        slot = self.host.commit(h, slot, got)
        return self.host.view(slot), got, slot

    # ---- load jobs: disk -> host -> device while the request waits -----------------------------------
    def bind(self, kv_cache: torch.Tensor) -> None:
        """The device KV cache that load jobs copy into, every layer as one tensor (layer l's
        cache is ``kv_cache[l]``), held weakly like ``save_later``'s."""
        self._cache = weakref.ref(kv_cache)

    def start_load(self, block_ids: list[int], found: LookupResult,
                   tokens: Callable[[int], tuple[int, ...]]) -> LoadJob:
        """Bring ``found`` (its host hits, then the blocks of ``found.disk``) into the device
        blocks ``block_ids``, one each in order, for a request that waits meanwhile: the
        prefetch threads read the disk blocks into reserved host slots (each file's head
        checked, then its tokens against ``tokens(i)``; the payload there too, or with
        ``device_check`` on the device after the copy), and each ``PUMP_BYTES`` read so far
        goes to the device on the copy streams. The engine asks ``poll`` each step, or
        ``cancel``s."""
        hashes = [h for h, _ in found.blocks] + list(found.disk)
        assert len(block_ids) == len(hashes) and self._prefetch is not None
        got = [(b, t, s, None) for (_, b), t, s in zip(found.blocks, found.tokens, found.slots)]
        n_host = len(got)
        job = LoadJob(list(block_ids), hashes, [tuple(tokens(i)) for i in range(len(hashes))],
                      got + [None] * len(found.disk), len(hashes))
        # host slots for the reads, reserved now and in order: the lowest free first, so the
        # blocks read lie in consecutive slots and each batch crosses the bus in one piece a layer
        job.landing = [None] * n_host + [self.host.reserve() if self.host is not None else None
                                         for _ in found.disk]
        found.blocks, found.tokens, found.slots, found.disk = [], [], [], []  # the job holds them now
        self.load_jobs += 1
        job.id = self.load_jobs
        self._jobs.append(job)
        for h in hashes:
            self._job_hashes[h] = job
        try:
            if self._procs is not None:
                self._read_on_processes(job, n_host)
            else:  # a few blocks a task: the reads run side by side, about in order, balanced
                for a in range(n_host, len(hashes), self.READ_RUN):
                    self._read_on_thread(job, a, min(a + self.READ_RUN, len(hashes)))
        except BaseException:  # shutting down: drop it whole
            left = []
            with self._lock:  # the slots of blocks no reader got
                for i, s in enumerate(job.landing):
                    if s is not None and i not in job.handed:
                        left.append(s)
                        job.landing[i] = None
            self._release_slots(left)
            self.cancel(job)
            raise
        return job  # what is read goes to the device at the next poll or wait_pending

    def _read_on_thread(self, job: LoadJob, a: int, b: int) -> None:
        with self._lock:
            self._threads_busy += 1
        try:
            self._prefetch.submit(self._read_for, job, a, b)
        except BaseException:
            with self._lock:
                self._threads_busy -= 1
            raise
        job.handed.update(range(a, b))

    def _read_on_processes(self, job: LoadJob, start: int) -> None:
        """Deal blocks ``start..`` of ``job`` out to the reader processes (those the host tier
        has by now are taken from there; one with no host slot to land in goes to a thread)."""
        items = []
        for i in range(start, len(job.hashes)):
            h = job.hashes[i]
            got = self.host.acquire(h) if self.host.lookup(h) else None  # stored since the lookup
            if got is not None:
                slot, job.landing[i] = job.landing[i], None
                self._resolve(job, i, (*got, None), slot, from_disk=False)
            elif job.landing[i] is None:
                self._read_on_thread(job, i, i + 1)
            else:
                items.append((i, h, job.expect[i], job.landing[i]))
        if not items:
            return
        with self._proc_lock:
            self._proc_jobs[job.id] = [job, len(items)]
            job.handed.update(i for i, *_ in items)  # from here a reader may be writing into them
            # with no reader alive, the job's blocks come straight back LOST: threads read them
            self._land(self._procs.submit(job.id, items, check=not self.device_check, touch=True))

    def _collect(self) -> None:
        """Take in what the reader processes have read, and send them what waits for room
        in their pipes (one thread at a time: another one collecting, e.g. an exit hook's
        flush beside the engine thread, is left to it)."""
        if self._procs is not None and self._proc_lock.acquire(blocking=False):
            try:
                self._land(self._procs.collect())
            finally:
                self._proc_lock.release()

    def _land(self, answers: list[tuple]) -> None:
        """The reader processes' answers (``kvfile.ReaderProcesses.collect``) into their jobs.
        Whatever goes wrong taking one in, that block ends a miss and its slot is let go:
        the job always finishes."""
        for job_id, results, seconds in answers:
            entry = self._proc_jobs.get(job_id)
            if entry is None:
                continue
            job = entry[0]
            entry[1] -= len(results)
            if entry[1] <= 0:
                del self._proc_jobs[job_id]
            for i, status, psum, size, why in results:
                slot, job.landing[i] = job.landing[i], None
                hold = [slot]  # the slot, until _land_one hands it on
                try:
                    self._land_one(job, i, status, psum, size, why, hold, seconds / len(results))
                except Exception:
                    logger.exception("KV offload: taking in block %s from a reader process failed; "
                                     "it is recomputed", job.hashes[i].hex())
                    with self._lock:
                        if job.landing[i] is not None:  # handed back for a thread that never ran
                            hold[0], job.landing[i] = job.landing[i], None
                        settle = job.got[i] is None  # (False for all once the job is closed)
                    if settle:
                        self._resolve(job, i, None, hold[0])
                    elif hold[0] is not None:
                        self._release_slots([hold[0]])

    def _land_one(self, job: LoadJob, i: int, status: int, psum: int, size: int, why: str, hold: list,
                  seconds: float) -> None:
        """One block's answer; ``hold[0]``, its host slot, is set to None as it is handed on."""
        h, slot = job.hashes[i], hold[0]
        if status == kvfile.OK:
            self.disk.read_hit(h, size, seconds)
            job.touched.add(i)
            hold[0] = None
            if self.device_check:  # published once the device has checked it
                self._resolve(job, i, (self.host.view(slot), job.expect[i], slot, psum))
            else:
                slot = self.host.commit(h, slot, job.expect[i])
                self._resolve(job, i, (self.host.view(slot), job.expect[i], slot, None))
        elif status in (kvfile.OTHER, kvfile.LOST):
            # not the file expected: read the general way, which says why; or the reader
            # died under it (or there was none): read it again
            job.landing[i], hold[0] = slot, None
            self._read_on_thread(job, i, i + 1)
        else:
            if status == kvfile.MISSING:  # removed by another engine sharing the directory
                self.disk.forget(h)
            elif status == kvfile.BAD:
                self.disk.bad_file(h, why)
            else:
                self.disk.unreadable(h, why)
            hold[0] = None
            self._resolve(job, i, None, slot)

    def prepare(self, block_ids: list[int]) -> None:
        """Before the first request (the engine calls this once, with the device KV cache
        bound): wait for the reader processes to start, and send one batch of zero blocks
        through a load job's path to the device, checked there, into ``block_ids`` (free
        device blocks the caller holds meanwhile; a batch's worth is enough). A restarted
        server's first filesystem hit then runs as fast as the next: on an H200 the first
        batch of a fresh process took ~50 ms more (allocations and first kernel launches).
        It also proves the device-side payload check agrees with the host's here. Nothing
        here stops the engine: a failure is logged, and the first load job pays instead."""
        if self._procs is not None:
            t0 = time.perf_counter()
            if self._procs.wait_ready():
                logger.info("KV offload: %d reader processes ready in %.1f s", self._procs.n, time.perf_counter() - t0)
            else:
                logger.warning("KV offload: the reader processes did not start; disk reads run on threads")
                self._procs.close()
                self._procs = None
        cache = self._cache() if self._cache is not None else None
        if not (self.device_check and self._prefetch is not None and self.host is not None and cache is not None):
            return
        slots = []
        try:
            for _ in block_ids[:min(self.pump_blocks, self.host.num_slots)]:
                s = self.host.reserve()
                if s is None:
                    break
                slots.append(s)
            if not slots:
                return
            for s in slots:
                self.host.view(s).zero_()
            with torch.inference_mode():
                ev, keep, flags = self._send_checked(cache, list(block_ids[:len(slots)]),
                                                     [self.host.view(s) for s in slots], slots, [0] * len(slots))
                self.hal.synchronize()
            if not all(flags.tolist()):
                logger.warning("KV offload: the device's payload check of zero blocks failed; "
                               "blocks read from disk will be recomputed")
        except Exception:
            logger.exception("KV offload: warming the load path up failed; the first load job warms it")
            try:
                self.hal.synchronize()  # what was queued runs out before the slots go
            except Exception:
                pass
        finally:
            self._release_slots(slots)

    def wait_reads(self, timeout: float = 60.0) -> None:
        """Wait until no read for a load job runs (on threads or processes), finished or
        cancelled ones' too: every host slot they read into is then let go or in use."""
        end = time.monotonic() + timeout
        while True:
            self._wake.clear()  # before looking: a thread finishing after it wakes the wait below
            self._collect()
            with self._lock:
                busy = self._threads_busy > 0
            if not busy and not (self._procs is not None and self._proc_jobs):
                return
            if time.monotonic() > end:
                logger.warning("KV offload: disk reads still running after %.0f s", timeout)
                return
            if self._procs is not None:
                self._procs.wait(0.05, also=[self._wake])
            else:
                self._wake.wait(0.05)

    def _read_for(self, job: LoadJob, a: int, b: int) -> None:
        """Prefetch thread: read blocks a..b-1 of ``job``, in order. Whatever goes wrong,
        every block of the task ends read or failed, so the job always finishes."""
        i = a
        try:
            for i in range(a, b):
                self._read_block(job, i)
        except BaseException:
            logger.exception("KV offload: a read task failed; the prefix is recomputed from block %d", i)
            with self._lock:
                for k in range(i, b):
                    if job.got[k] is None:
                        job.got[k] = False
                job.end = min(job.end, i)
                left = [job.landing[k] for k in range(i, b) if job.landing[k] is not None]
                for k in range(i, b):
                    job.landing[k] = None
                self._wake.set()
            self._release_slots(left)
        finally:
            with self._lock:
                self._threads_busy -= 1
                if not self._threads_busy:  # for wait_reads
                    self._wake.set()

    def _read_block(self, job: LoadJob, i: int) -> None:
        """Read block i of ``job`` (from the host tier if it is there by now)."""
        h = job.hashes[i]
        got = None
        from_disk = False
        slot, job.landing[i] = job.landing[i], None
        try:
            if job.closed or i >= job.end:
                pass
            elif self.host is not None and self.host.lookup(h):  # stored meanwhile, or never on disk
                got = self.host.acquire(h)
            else:
                mine, slot, from_disk = slot, None, True  # the slot is used or let go below
                got = self._promote(h, mine, check=not self.device_check, expect=job.expect[i])
            if got is not None and len(got) == 3:  # checked already
                got = (*got, None)
        except Exception:  # never lose the slot or stall the request: a miss, recomputed
            logger.exception("KV offload: reading block %s failed", h.hex())
            self.disk.forget(h)
            got = None
        self._resolve(job, i, got, slot, from_disk)

    def _resolve(self, job: LoadJob, i: int, got, free: int | None = None, from_disk: bool = True) -> None:
        """Block i of ``job`` is read: ``got`` (host block, tokens, host slot, the payload
        checksum the device still has to check or None), or None for a miss. ``free``: a host
        slot to let go. Tokens other than the job's end the prefix (and, ``from_disk``, the
        file goes)."""
        h = job.hashes[i]
        drop = mismatch = None
        with self._lock:
            if got is not None and got[1] != job.expect[i]:
                self.token_mismatches += 1
                drop, got, mismatch = got, None, from_disk
            elif got is not None and (job.closed or i >= job.end):
                drop, got = got, None
            job.got[i] = False if got is None else got
            if got is None and i < job.end:  # only ever lowered (the engine thread lowers it too)
                job.end = i
            if job.read_all() or job.resolved - job.sent >= self.pump_blocks:
                self._wake.set()
        self._release_slots([s for s in (free, drop[2] if drop is not None else None) if s is not None])
        if mismatch:  # the file holds other tokens under this hash: never read it again
            self.disk.reject(h, "its tokens are not the prompt's")
            if self.host is not None:
                self.host.evict(h)

    def _device_weights(self, device) -> torch.Tensor:
        """``checksum_weights`` for this block shape, ``[layers, 1, words a layer]`` int64 on ``device``."""
        w = self._weights.get(str(device))
        if w is None:
            n = self.block_shape[0]
            w = torch.from_numpy(checksum_weights(n, self.block_bytes // n).view(np.int64)).unsqueeze(1)
            w = self._weights[str(device)] = w.to(device)
        return w

    def _send_checked(self, cache: torch.Tensor, ids: list[int], blocks: list, slots: list[int],
                      sums: list) -> tuple:
        """Host blocks -> device blocks ``ids`` on copy lane 0, checked there on the way:
        into one device buffer ``[layers, n, ...]``, the payload checksum of each block with
        a ``sums`` entry (the file's; None: nothing to check) computed over it, then moved
        into ``cache`` (every layer, ``[layers, 2, blocks, ...]``) in one go.
        Returns (event marking it done, what must outlive it, per-block ok flags in host
        memory, valid once it is done).

        It runs while a dozen reader threads contend for the GIL, and each torch call is a
        trip through it: the host-side inputs are filled through numpy, and the copies are
        queued by a few calls, not one a layer."""
        dev = cache.device
        n, layers = len(ids), self.block_shape[0]
        pool = self.host.pool if self.host is not None else None
        want = host_empty(self.hal, (n,), torch.int64)
        want.numpy().view(np.uint64)[:] = [0 if v is None else v for v in sums]
        unchecked = [k for k, v in enumerate(sums) if v is None]
        mask = None
        if unchecked:
            mask = host_empty(self.hal, (n,), torch.bool)
            mask.numpy()[:] = [v is None for v in sums]
        mapping = self._mapping(ids, device_first=False)
        flags = host_empty(self.hal, (n,), torch.bool)
        ev = self.hal.event()
        with self.hal.copy_stream(0):
            buf = torch.empty((layers, n, *self.block_shape[1:]), dtype=self.dtype, device=dev)
            dst, src = [], []
            for i, j, slot in self._runs(slots):
                dst += buf[:, i:j].unbind(0)
                src += self._host_part(blocks, pool, i, j, slot).unbind(0)
            torch._foreach_copy_(dst, src, non_blocking=True)
            if len(unchecked) < n:
                words = buf.view(layers, n, -1).view(torch.int64)
                ok = device_checksums(words, self._device_weights(dev)) == want.to(dev, non_blocking=True)
                if mask is not None:
                    ok |= mask.to(dev, non_blocking=True)
                flags.copy_(ok, non_blocking=True)
            else:
                flags.fill_(True)
            for kv in range(2):  # k, then v: every layer at once, [layers, blocks, ...]
                self.hal.swap_blocks(buf[:, :, kv], cache[:, kv], mapping)
            ev.record()
        return ev, [blocks, buf, want, mask, mapping], flags

    def _pump(self, job: LoadJob) -> None:
        """Send what ``job`` has read to the device, once there is a batch (or all is read)."""
        with self._lock:
            if job.closed:
                return
            done = job.read_all()
            a, b = job.sent, min(job.resolved, job.end)  # past a failure: not needed
            if b <= a or (b - a < self.pump_blocks and not done):
                return
            job.sent = b
        # in order: the reads landed in consecutive host slots, so a batch crosses the bus
        # in one piece a layer
        ready = list(range(a, b))
        ids = [job.block_ids[i] for i in ready]
        blocks = [job.got[i][0] for i in ready]
        slots = [job.got[i][2] for i in ready]
        stacked = self._cache() if self._cache is not None else None
        if stacked is None:
            raise RuntimeError("KV offload: start_load before bind(kv_cache)")
        caches = list(stacked.unbind(0))
        with torch.inference_mode():
            t0 = time.perf_counter()
            if not self.layout.identity:  # through the reused staging buffer, synchronously
                self.scatter(caches, ids, blocks, [-1] * len(ids))
                job.uploads.append((None, [], ready, None))
                return
            if self.device_check:  # in pieces of at most CHECK_BYTES (plus as much for the check)
                step = max(1, self.CHECK_BYTES // self.block_bytes)
                for a in range(0, len(ready), step):
                    sl = slice(a, a + step)
                    sums = [job.got[i][3] for i in ready[sl]]
                    ev, keep, flags = self._send_checked(stacked, ids[sl], blocks[sl], slots[sl], sums)
                    job.uploads.append((ev, keep, ready[sl], flags))
            else:  # in order on the one stream: done when queued
                self._to_device(caches, ids, blocks, slots, self.host.pool if self.host is not None else None)
                self.hal.synchronize()
                job.uploads.append((None, [], ready, None))
        self.blocks_loaded += len(ids)
        self.bytes_to_device += len(ids) * self.block_bytes
        self.load_seconds += time.perf_counter() - t0

    def poll(self, job: LoadJob) -> int | None:
        """None while ``job`` is loading (sending what was read meanwhile); else how many of
        its blocks, from the first, are in their device blocks: the rest failed (a miss, a
        bad file, other tokens) and hold nothing. The job is over then."""
        self._collect()
        self._send(job)
        if job.failed:
            self._close(job)
            return 0
        with self._lock:
            if not job.read_all() or job.sent < job.end:  # (all read: _send sent the rest)
                return None
        if any(ev is not None and not ev.query() for ev, *_ in job.uploads):
            return None
        self._settle(job)
        self._close(job)
        self.load_count += 1
        self.load_jobs_done += 1
        self.load_job_seconds += time.perf_counter() - job.started
        return job.end

    def _send(self, job: LoadJob) -> None:
        """``_pump``; if a copy to the device fails (out of device memory, say), the job fails
        as a whole, its blocks recomputed, and the engine goes on."""
        try:
            self._pump(job)
        except Exception:
            logger.exception("KV offload: copying a prefix read from disk to the device failed; "
                             "it is recomputed")
            try:
                self.hal.synchronize()  # what was queued before the failure runs out first
            except Exception:
                pass
            with self._lock:
                job.failed, job.end = True, 0

    def _settle(self, job: LoadJob) -> None:
        """A job's copies are done: blocks the device found damaged end the usable prefix
        (their files go), and the blocks read for it join the host tier."""
        for _, _, idx, flags in job.uploads:
            if flags is not None:
                for i, ok in zip(idx, flags.tolist()):
                    if not ok:
                        self.disk.reject(job.hashes[i], "payload checksum mismatch (checked on the device)")
                        with self._lock:  # reader threads still running may lower it too
                            job.end = min(job.end, i)
        read = []
        for i in range(len(job.got)):
            g = job.got[i]
            if g and g[3] is not None and i < job.end:  # read unchecked, now checked
                slot = self.host.commit(job.hashes[i], g[2], g[1])
                job.got[i] = (self.host.view(slot), g[1], slot, None)
                if i not in job.touched:
                    read.append(job.hashes[i])
        if read:
            self.disk.touch_many(read)

    def cancel(self, job: LoadJob) -> None:
        """Drop ``job`` (its request was aborted): its device blocks may be reused once this
        returns."""
        if job.sent:  # copies may be in flight
            self.hal.synchronize()
        self._close(job)

    def _close(self, job: LoadJob) -> None:
        with self._lock:
            job.closed = True  # reads still running release their own slots
            slots = [g[2] for g in job.got if g]
            job.got = [False] * len(job.got)
            job.uploads = []
        self._release_slots(slots)
        if job in self._jobs:
            self._jobs.remove(job)
        for h in job.hashes:
            if self._job_hashes.get(h) is job:
                del self._job_hashes[h]

    def wait_pending(self, timeout: float = 0.05) -> None:
        """Block briefly while load jobs run (the engine calls this when a step had nothing
        else to do): send what was read, then wait for the next batch of reads, or for the
        copies when everything is read."""
        if not self._jobs:
            self._collect()  # a cancelled job's reads still coming back let their slots go
            return
        self._wake.clear()
        self._collect()
        for job in list(self._jobs):
            self._send(job)
        with self._lock:
            reading = any(not job.read_all() for job in self._jobs)
        if not reading:
            self.hal.synchronize()
        elif self._procs is not None:
            self._procs.wait(timeout, also=[self._wake])
        else:
            self._wake.wait(timeout)

    def blocks_to_save(self, seq, new: list[tuple[int, bytes]], block_size: int
                       ) -> list[tuple[int, bytes, tuple[int, ...]]]:
        """Of the blocks ``KVCacheManager.commit`` just registered for ``seq``, those to
        write through: prompt blocks (and generated ones with ``offload_generated``)."""
        limit = None if self.offload_generated else seq.num_prompt_tokens // block_size
        index = {h: i for i, h in enumerate(seq.block_hashes[:limit])}
        out = []
        for bid, h in new:
            i = index.get(h)
            if i is not None:
                out.append((bid, h, tuple(seq.token_ids[i * block_size:(i + 1) * block_size])))
        return out

    # ---- housekeeping -----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Finish queued write-through, then wait for disk writes and in-flight prefetches
        (tests, shutdown)."""
        self.save_pending()
        self.wait_reads()
        for tier in self.tiers:
            tier.flush()

    def close(self) -> None:
        self.flush()
        for job in list(self._jobs):
            self.cancel(job)
        self.wait_reads()
        if self._procs is not None:
            self._procs.close()
        if self._prefetch is not None:
            self._prefetch.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    def stats(self) -> dict[str, Any]:
        d: dict[str, Any] = {t.name: t.stats_dict() for t in self.tiers}
        d.update(blocks_saved=self.blocks_saved, blocks_loaded=self.blocks_loaded,
                 bytes_to_device=self.bytes_to_device, bytes_from_device=self.bytes_from_device,
                 load_seconds=self.load_seconds, load_count=self.load_count, token_mismatches=self.token_mismatches,
                 lookups=self.lookups, load_jobs=self.load_jobs, load_jobs_done=self.load_jobs_done,
                 load_job_seconds=self.load_job_seconds,
                 bad_files=sum(t.stats.bad_files for t in self.tiers))
        return d


def _noop() -> None:
    pass


class _Waker:
    """``threading.Event``'s set / clear / wait over a pipe, so that one wait covers it and
    the reader processes' pipes."""

    def __init__(self):
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        weakref.finalize(self, _close_fds, self._r, self._w)

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:  # the pipe is full: it is set
            pass

    def clear(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> None:
        kvfile.wait_fds([self._r], [], timeout)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _flush_at_exit(ref: "weakref.ref[OffloadManager]") -> None:
    m = ref()  # held weakly: the hook must not keep a dropped engine (and its cache) alive
    if m is None:
        return
    try:
        m.flush()
    except Exception:  # the device may be gone already: the blocks are only not cached
        logger.warning("KV offload: write-through at exit failed", exc_info=True)


LANDING_MAX_BYTES = 4 << 30


def landing_host_bytes(block_bytes: int, block_size: int, max_model_len: int) -> int:
    """The host tier a filesystem tier gets when none is configured: disk reads land in
    host memory on their way to the device (pinned where the backend asks), so there is
    always one; room for two of the longest prompts, at most ``LANDING_MAX_BYTES``."""
    blocks = 2 * -(-max_model_len // block_size)
    return max(block_bytes, min(blocks * block_bytes, LANDING_MAX_BYTES // block_bytes * block_bytes))


def build_offload(config, hal: "Backend", model_config, device, model_fingerprint: bytes,
                  max_model_len: int | None = None) -> "OffloadManager | None":
    """The engine's offload manager from ``EngineConfig``, or None when no tier is set."""
    if not (config.kv_offload_host_bytes or config.kv_offload_dir):
        return None
    if not config.enable_prefix_caching:
        logger.warning("KV offload needs the prefix cache (block hashes); it is off, so offload is off")
        return None
    mc = model_config
    layout = KVLayout(hal, config.block_size, mc.num_kv_heads, mc.head_dim, mc.dtype, device)
    host_bytes = config.kv_offload_host_bytes
    if config.kv_offload_dir and not host_bytes:
        block_bytes = 2 * mc.num_layers * layout.numel * torch.empty((), dtype=mc.dtype).element_size()
        host_bytes = landing_host_bytes(block_bytes, config.block_size,
                                        max_model_len or mc.max_position_embeddings)
        logger.info("KV offload: no host tier set; the filesystem tier reads into a %.2f GiB host tier",
                    host_bytes / 2**30)
    m = OffloadManager(hal, layout, mc.num_layers, model_fingerprint,
                       host_bytes=host_bytes, disk_dir=config.kv_offload_dir,
                       disk_bytes=config.kv_offload_disk_bytes)
    atexit.register(_flush_at_exit, weakref.ref(m))  # queued write-through lands before the process exits
    logger.info("KV offload: host %s, disk %s (%s); %d bytes a block, %s layout",
                f"{m.host.num_slots} blocks" if m.host else "off",
                m.disk.dir if m.disk else "off",
                f"{len(m.disk)} blocks found" if m.disk else "-", m.block_bytes,
                "native" if layout.identity else "permuted")
    return m
