"""The host-memory tier: a fixed pool of host slots (pinned where the HAL says so, in shared
memory where reader processes read into it), LRU, layer-major so that the device can take a
prompt's blocks a layer at a time.
"""
from __future__ import annotations

import heapq
import logging
import math
import os
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from halserve.engine.offload import kvfile
from halserve.engine.offload.common import KVTier, host_empty

if TYPE_CHECKING:
    from halserve.hal.interface import Backend

logger = logging.getLogger("halserve")


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
