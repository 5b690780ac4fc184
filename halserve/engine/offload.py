"""KV offload tiers under the prefix cache: host memory, then the filesystem.

Every tier holds whole KV blocks keyed by their prefix-cache block hash, in one canonical,
backend-neutral layout: ``[2, layers, block_size, kv_heads, head_dim]`` in the model dtype.
A block written by one backend (any ``kv_cache_shape`` layout) loads on another when the
model, dtype and block geometry match; the tier fingerprint says so.

- ``HostMemoryTier``: a fixed pool of host buffers (pinned where the HAL says so), LRU.
- ``FileSystemTier``: one file per block under ``<dir>/<fingerprint>/``, LRU by mtime so the
  order survives restarts; a header and a CRC32 guard every file, writes are atomic
  (temp file + rename) and run on a background thread. A corrupt, truncated or mismatched
  file is a miss: it is removed and counted, and the block is recomputed.
- ``OffloadManager``: what the engine talks to. ``save`` copies newly committed device
  blocks down (write-through), ``lookup`` continues a device prefix hit through the tiers
  (disk reads run on a prefetch thread; the sequence waits while others keep running), and
  ``load`` copies found blocks into fresh device blocks through ``hal.swap_blocks``.
- ``KVLayout``: converts between a backend's block layout and the canonical one. It learns
  the layout by writing known values through the backend's own ``write_kv``, so it needs no
  knowledge of any backend.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from halserve.hal.interface import Backend

logger = logging.getLogger("halserve")

MAGIC = b"HSKVBLK\x00"
VERSION = 1
_PREFIX = struct.Struct("<8sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
FILE_SUFFIX = ".kv"


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

    h = hashlib.sha256(b"halserve-kv-tier-v1")
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
    """Blocks in one preallocated host pool (``host_empty``: pinned where the HAL asks)."""

    name = "host"

    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, capacity_bytes: int,
                 hal: "Backend | None" = None):
        super().__init__(block_shape, dtype, capacity_bytes)
        self.num_slots = capacity_bytes // self.block_bytes
        if self.num_slots < 1:
            raise ValueError(f"kv_offload_host_bytes={capacity_bytes} holds no KV block of "
                             f"{self.block_bytes} bytes; use at least {self.block_bytes} (or 0 to disable)")
        self.pool = host_empty(hal, (self.num_slots, *self.block_shape), dtype)
        self.entries: OrderedDict[bytes, tuple[int, tuple[int, ...]]] = OrderedDict()  # LRU first
        self.free_slots = list(range(self.num_slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, h: bytes) -> bool:
        with self.lock:
            return h in self.entries

    def load(self, h: bytes):
        t0 = time.perf_counter()
        with self.lock:
            e = self.entries.get(h)
            if e is None:
                self.stats.misses += 1
                return None
            self.entries.move_to_end(h)
            slot, tokens = e
            block = self.pool[slot].clone()  # the slot may be reused once the lock drops
            self.stats.hits += 1
            self.stats.bytes_read += self.block_bytes
            self.stats.load_seconds += time.perf_counter() - t0
            return block, tokens

    def store(self, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]) -> None:
        with self.lock:
            if h in self.entries:
                self.entries.move_to_end(h)
                return
            if not self.free_slots:
                old, (slot, _) = self.entries.popitem(last=False)
                self.free_slots.append(slot)
                self.stats.evictions += 1
            slot = self.free_slots.pop()
            self.pool[slot].copy_(block.reshape(self.block_shape))
            self.entries[h] = (slot, tuple(tokens))
            self.stats.stores += 1
            self.stats.bytes_written += self.block_bytes

    def evict(self, h: bytes) -> bool:
        with self.lock:
            e = self.entries.pop(h, None)
            if e is None:
                return False
            self.free_slots.append(e[0])
            self.stats.evictions += 1
            return True

    def clear(self) -> None:
        with self.lock:
            for h in list(self.entries):
                self.evict(h)


class BadBlockFile(Exception):
    """A block file that must not be used; the message says why."""


def encode_block_file(fingerprint: bytes, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]) -> bytes:
    header = json.dumps({
        "fingerprint": fingerprint.hex(), "hash": h.hex(), "dtype": dtype_name(block.dtype),
        "shape": list(block.shape), "tokens": list(tokens),
    }, separators=(",", ":")).encode()
    payload = block.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    body = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload
    return body + _CRC.pack(zlib.crc32(body))


def decode_block_file(data: "bytes | bytearray", fingerprint: bytes, h: bytes, dtype: torch.dtype,
                      shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Parse and check a block file; raises BadBlockFile naming the first problem."""
    if len(data) < _PREFIX.size + _CRC.size:
        raise BadBlockFile(f"truncated: {len(data)} bytes")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BadBlockFile(f"bad magic {magic!r}")
    if version != VERSION:
        raise BadBlockFile(f"version {version}, expected {VERSION}")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(data) != _PREFIX.size + hlen + nbytes + _CRC.size:
        raise BadBlockFile(f"size {len(data)} does not match header length {hlen} + payload {nbytes}")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[:len(data) - _CRC.size]) != crc:
        raise BadBlockFile("checksum mismatch")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + hlen])
    except ValueError as e:
        raise BadBlockFile(f"unreadable header: {e}") from None
    if header.get("fingerprint") != fingerprint.hex():
        raise BadBlockFile("fingerprint mismatch (other model, dtype or block geometry)")
    if header.get("hash") != h.hex():
        raise BadBlockFile("block hash mismatch")
    if header.get("dtype") != dtype_name(dtype) or tuple(header.get("shape", ())) != tuple(shape):
        raise BadBlockFile(f"dtype/shape {header.get('dtype')}{header.get('shape')} != {dtype_name(dtype)}{list(shape)}")
    start = _PREFIX.size + hlen
    if not isinstance(data, bytearray):
        data = bytearray(data)
    block = torch.frombuffer(data, dtype=torch.uint8, offset=start, count=nbytes).view(dtype).reshape(shape)
    return block, tuple(int(t) for t in header.get("tokens", ()))


class FileSystemTier(KVTier):
    """One file per block under ``<root>/<fingerprint[:16]>/<hash[:2]>/<hash>.kv``.

    Writes go through a background thread (``flush`` waits for them); the file index is
    rebuilt from the directory at start-up, oldest mtime first, so a restarted engine finds
    what an earlier one wrote and keeps the LRU order.
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike, fingerprint: bytes, block_shape: tuple[int, ...],
                 dtype: torch.dtype, capacity_bytes: int, write_async: bool = True):
        super().__init__(block_shape, dtype, capacity_bytes)
        self.fingerprint = fingerprint
        self.dir = Path(root) / fingerprint.hex()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file_bytes = len(encode_block_file(fingerprint, b"\0" * 32,
                                                torch.zeros(block_shape, dtype=dtype), ()))
        self.index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, LRU first
        self.total_bytes = 0
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

    def _drop(self, h: bytes) -> None:
        size = self.index.pop(h, None)
        if size is not None:
            self.total_bytes -= size
        try:
            self.path(h).unlink()
        except FileNotFoundError:
            pass

    def load(self, h: bytes):
        t0 = time.perf_counter()
        p = self.path(h)
        try:
            with open(p, "rb") as f:  # into a bytearray the block tensor can share, no copy
                data = bytearray(os.fstat(f.fileno()).st_size)
                del data[f.readinto(data):]  # a file that shrank under us reads short
        except FileNotFoundError:  # removed by another engine sharing the directory
            with self.lock:
                self.stats.misses += 1
                size = self.index.pop(h, None)
                if size is not None:
                    self.total_bytes -= size
            return None
        try:
            block, tokens = decode_block_file(data, self.fingerprint, h, self.dtype, self.block_shape)
        except BadBlockFile as e:
            logger.warning("KV offload: removing bad block file %s: %s", p, e)
            with self.lock:
                self.stats.bad_files += 1
                self.stats.misses += 1
                self._drop(h)
            return None
        with self.lock:
            if h in self.index:
                self.index.move_to_end(h)
            self.stats.hits += 1
            self.stats.bytes_read += len(data)
            self.stats.load_seconds += time.perf_counter() - t0
        try:
            os.utime(p)  # LRU order that survives a restart
        except OSError:
            pass
        return block, tokens

    def store(self, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]) -> None:
        with self.lock:
            if h in self.index:
                self.index.move_to_end(h)
                return
            if h in self._pending or self.file_bytes > self.capacity_bytes:
                return
            self._pending.add(h)
        if self._queue is None:
            self._write(h, block, tokens)
        else:
            self._queue.put((h, block.detach().to("cpu", copy=True), tuple(tokens)))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:  # a full disk must not kill the engine; the block stays uncached
                logger.exception("KV offload: writing a block file failed")
            finally:
                self._queue.task_done()

    def _write(self, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]) -> None:
        try:
            data = encode_block_file(self.fingerprint, h, block, tokens)
            p = self.path(h)
            p.parent.mkdir(exist_ok=True)
            tmp = p.with_name(f"{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
            with self.lock:
                self.index[h] = len(data)
                self.total_bytes += len(data)
                self.stats.stores += 1
                self.stats.bytes_written += len(data)
                while self.total_bytes > self.capacity_bytes and self.index:
                    old = next(iter(self.index))
                    self._drop(old)
                    self.stats.evictions += 1
        finally:
            with self.lock:
                self._pending.discard(h)

    def evict(self, h: bytes) -> bool:
        with self.lock:
            if h not in self.index:
                return False
            self._drop(h)
            self.stats.evictions += 1
            return True

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
    """Blocks found below the device, in prefix order: (hash, canonical block) pairs.
    ``pending``: more of the prefix is being read from disk; ask again next step."""

    blocks: list[tuple[bytes, torch.Tensor]] = field(default_factory=list)
    tokens: list[tuple[int, ...]] = field(default_factory=list)
    pending: bool = False


class OffloadManager:
    """Tiers in order (host, then disk) plus the device copies, for one engine."""

    READY_TTL_S = 60.0  # prefetched blocks nobody asked for again (aborted requests) expire

    def __init__(self, hal: "Backend", layout: KVLayout, num_layers: int, model_fingerprint: bytes, *,
                 host_bytes: int = 0, disk_dir: str | None = None, disk_bytes: int = 16 << 30,
                 offload_generated: bool = False, async_disk: bool = True):
        self.hal = hal
        self.layout = layout
        self.num_layers = num_layers
        self.block_shape = (2, num_layers, *layout.canonical)
        self.dtype = layout.dtype
        self.fingerprint = tier_fingerprint(model_fingerprint, self.dtype, self.block_shape)
        self.offload_generated = offload_generated
        self.host: HostMemoryTier | None = None
        self.disk: FileSystemTier | None = None
        if host_bytes:
            self.host = HostMemoryTier(self.block_shape, self.dtype, host_bytes, hal)
        if disk_dir:
            self.disk = FileSystemTier(disk_dir, self.fingerprint, self.block_shape, self.dtype,
                                       disk_bytes, write_async=async_disk)
        self.tiers: list[KVTier] = [t for t in (self.host, self.disk) if t is not None]
        self.async_disk = async_disk
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="halserve-kv-prefetch") if async_disk else None
        self._inflight: dict[bytes, Future] = {}
        # read by the prefetch thread (or given back), waiting for the next lookup: hash ->
        # (block, tokens, when); entries of abandoned requests age out
        self._ready: OrderedDict[bytes, tuple[torch.Tensor, tuple[int, ...], float]] = OrderedDict()
        self._lock = threading.Lock()
        # engine-side counters
        self.blocks_saved = 0
        self.blocks_loaded = 0
        self.bytes_to_device = 0
        self.bytes_from_device = 0
        self.load_seconds = 0.0  # device-side copy-in time
        self.load_count = 0  # copy-ins (one per admitted sequence that found blocks below)
        self.token_mismatches = 0
        self.lookups = 0
        self.deferred = 0

    @property
    def enabled(self) -> bool:
        return bool(self.tiers)

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * torch.empty((), dtype=self.dtype).element_size()

    # ---- device <-> host ----------------------------------------------------------------------
    @torch.inference_mode()
    def gather(self, kv_caches: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
        """Device blocks -> canonical host blocks ``[n, 2, layers, bs, hk, d]``."""
        n = len(block_ids)
        mapping = torch.tensor([[b, i] for i, b in enumerate(block_ids)], dtype=torch.int64)
        if self.layout.identity:
            # gather every layer's blocks on the device, then one copy to the host
            dev = kv_caches[0].device
            on_dev = torch.empty((n, *self.block_shape), dtype=self.dtype, device=dev)
            for layer, cache in enumerate(kv_caches):
                self.hal.swap_blocks(cache, on_dev[:, :, layer].transpose(0, 1), mapping)
            if on_dev.device.type == "cpu":
                return on_dev
            staging = self._staging_blocks(n)  # pinned where the HAL asks: a fast copy down
            staging.copy_(on_dev, non_blocking=True)
            self.hal.synchronize()
            return staging.clone()  # tiers keep their own copy; the staging buffer is reused
        out = torch.empty((n, *self.block_shape), dtype=self.dtype)
        staging = self._staging(n)
        for layer, cache in enumerate(kv_caches):
            self.hal.swap_blocks(cache, staging, mapping)
            self.hal.synchronize()
            out[:, :, layer] = self.layout.to_canonical(staging, n).transpose(0, 1)
        return out

    def _staging(self, n: int) -> torch.Tensor:
        """A reusable host buffer (pinned where the HAL asks) for n blocks of one layer."""
        shape = self.layout.backend_shape(n)
        buf = getattr(self, "_stage_buf", None)
        if buf is None or buf.numel() < math.prod(shape):
            buf = self._stage_buf = host_empty(self.hal, (math.prod(shape),), self.dtype)
        return buf[:math.prod(shape)].view(shape)

    def _staging_blocks(self, n: int) -> torch.Tensor:
        """A reusable host buffer for n canonical blocks ``[n, 2, layers, bs, hk, d]``."""
        buf = getattr(self, "_stage_all", None)
        need = n * math.prod(self.block_shape)
        if buf is None or buf.numel() < need:
            buf = self._stage_all = host_empty(self.hal, (need,), self.dtype)
        return buf[:need].view(n, *self.block_shape)

    @torch.inference_mode()
    def scatter(self, kv_caches: list[torch.Tensor], block_ids: list[int], blocks: list[torch.Tensor]) -> None:
        """Canonical host blocks -> the device blocks ``block_ids`` (one swap per layer)."""
        n = len(block_ids)
        if n == 0:
            return
        t0 = time.perf_counter()
        mapping = torch.tensor([[i, b] for i, b in enumerate(block_ids)], dtype=torch.int64)
        if self.layout.identity:
            # one host pass into the (pinned) staging buffer, one copy to the device, then
            # each layer's blocks are placed by a device-side swap_blocks
            whole = self._staging_blocks(n)
            torch.stack(blocks, out=whole)
            on_dev = whole.to(kv_caches[0].device, non_blocking=True)
            for layer, cache in enumerate(kv_caches):
                self.hal.swap_blocks(on_dev[:, :, layer].transpose(0, 1), cache, mapping)
            self.hal.synchronize()  # the staging buffer is reused by the next load
        else:
            for layer, cache in enumerate(kv_caches):
                staging = self._staging(n)
                staging.copy_(self.layout.from_canonical(torch.stack([b[:, layer] for b in blocks], dim=1), n))
                self.hal.swap_blocks(staging, cache, mapping)
                self.hal.synchronize()  # the staging buffer is reused by the next layer
        self.blocks_loaded += n
        self.load_count += 1
        self.bytes_to_device += n * self.block_bytes
        self.load_seconds += time.perf_counter() - t0

    # ---- write-through --------------------------------------------------------------------------
    def save(self, kv_caches: list[torch.Tensor], blocks: list[tuple[int, bytes, tuple[int, ...]]]) -> None:
        """Copy newly committed device blocks (block_id, hash, tokens) into every tier that
        lacks them. Disk writes are queued; ``flush`` waits for them."""
        todo = [(b, h, t) for b, h, t in blocks if any(not tier.lookup(h) for tier in self.tiers)]
        if not todo:
            return
        data = self.gather(kv_caches, [b for b, _, _ in todo])
        self.blocks_saved += len(todo)
        self.bytes_from_device += len(todo) * self.block_bytes
        for (_, h, tokens), block in zip(todo, data):
            for tier in self.tiers:
                tier.store(h, block, tokens)

    # ---- lookup and promotion ----------------------------------------------------------------------
    def lookup(self, hashes: list[bytes], tokens: Callable[[int], tuple[int, ...]]) -> LookupResult:
        """Continue a device prefix miss: the longest run of ``hashes`` found below the
        device, checked token for token (``tokens(i)`` gives block i's tokens).

        Host hits are returned at once. Disk hits are read by the prefetch thread (or inline
        when async is off); while any are in flight ``pending`` is set and the caller
        should retry next step, so a disk read never stalls running requests."""
        res = LookupResult()
        if not self.tiers or not hashes:
            return res
        self.lookups += 1
        to_fetch: list[bytes] = []
        for i, h in enumerate(hashes):
            with self._lock:
                got = self._ready.pop(h, None)
                inflight = h in self._inflight
            if got is not None:
                got = got[:2]
            if got is None and inflight:
                res.pending = True
                break
            if got is None and self.host is not None:
                if self.host.lookup(h):
                    got = self.host.load(h)
                else:
                    self.host.stats.misses += 1
            if got is None and self.disk is not None:
                if not self.disk.lookup(h):
                    self.disk.stats.misses += 1
                elif self._prefetch is None:
                    got = self._promote(h)
                else:
                    for x in hashes[i:]:  # the contiguous run still below the device
                        if self.host is not None and self.host.lookup(x):
                            continue
                        if not self.disk.lookup(x):
                            break
                        to_fetch.append(x)
                    res.pending = True
                    break
            if got is None:
                break
            block, toks = got
            if toks != tuple(tokens(i)):
                self.token_mismatches += 1
                break
            res.blocks.append((h, block))
            res.tokens.append(toks)
        if to_fetch:
            self._submit(to_fetch)
        if res.pending:
            self.deferred += 1
            # keep what is already found for the next try; nothing is lost
            self.give_back(res)
            res.blocks, res.tokens = [], []
        return res

    def give_back(self, res: LookupResult) -> None:
        """Keep looked-up blocks that could not be used this step for the next lookup."""
        with self._lock:
            for (h, b), t in zip(res.blocks, res.tokens):
                self._ready[h] = (b, t, time.monotonic())

    def _promote(self, h: bytes) -> "tuple[torch.Tensor, tuple[int, ...]] | None":
        got = self.disk.load(h)
        if got is not None and self.host is not None:
            self.host.store(h, got[0], got[1])
        return got

    def _submit(self, hashes: list[bytes]) -> None:
        with self._lock:
            old = time.monotonic() - self.READY_TTL_S
            while self._ready and next(iter(self._ready.values()))[2] < old:
                self._ready.popitem(last=False)
            new = [h for h in hashes if h not in self._inflight]
            if not new:
                return
            fut = self._prefetch.submit(self._fetch_many, new)
            for h in new:
                self._inflight[h] = fut

    def _fetch_many(self, hashes: list[bytes]) -> None:
        try:
            for h in hashes:
                got = self._promote(h)
                with self._lock:
                    if got is not None:
                        self._ready[h] = (*got, time.monotonic())
                if got is None:
                    break  # the rest of the prefix is unusable without this block
        finally:
            with self._lock:
                for h in hashes:
                    self._inflight.pop(h, None)

    def wait_pending(self, timeout: float = 0.05) -> None:
        """Block briefly until a prefetch finishes (the engine calls this when a step had
        nothing else to do)."""
        with self._lock:
            futs = set(self._inflight.values())
        for f in futs:
            try:
                f.result(timeout=timeout)
            except Exception:
                pass
            return

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
        """Wait for queued disk writes and in-flight prefetches (tests, shutdown)."""
        with self._lock:
            futs = set(self._inflight.values())
        for f in futs:
            f.result()
        for tier in self.tiers:
            tier.flush()

    def close(self) -> None:
        self.flush()
        if self._prefetch is not None:
            self._prefetch.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    def stats(self) -> dict[str, Any]:
        d: dict[str, Any] = {t.name: t.stats_dict() for t in self.tiers}
        d.update(blocks_saved=self.blocks_saved, blocks_loaded=self.blocks_loaded,
                 bytes_to_device=self.bytes_to_device, bytes_from_device=self.bytes_from_device,
                 load_seconds=self.load_seconds, load_count=self.load_count, token_mismatches=self.token_mismatches,
                 lookups=self.lookups, deferred_admissions=self.deferred,
                 bad_files=sum(t.stats.bad_files for t in self.tiers))
        return d


def build_offload(config, hal: "Backend", model_config, device, model_fingerprint: bytes
                  ) -> "OffloadManager | None":
    """The engine's offload manager from ``EngineConfig``, or None when no tier is set."""
    if not (config.kv_offload_host_bytes or config.kv_offload_dir):
        return None
    if not config.enable_prefix_caching:
        logger.warning("KV offload needs the prefix cache (block hashes); it is off, so offload is off")
        return None
    mc = model_config
    layout = KVLayout(hal, config.block_size, mc.num_kv_heads, mc.head_dim, mc.dtype, device)
    m = OffloadManager(hal, layout, mc.num_layers, model_fingerprint,
                       host_bytes=config.kv_offload_host_bytes, disk_dir=config.kv_offload_dir,
                       disk_bytes=config.kv_offload_disk_bytes)
    atexit.register(m.flush)  # queued disk writes land before the process exits
    logger.info("KV offload: host %s, disk %s (%s); %d bytes a block, %s layout",
                f"{m.host.num_slots} blocks" if m.host else "off",
                m.disk.dir if m.disk else "off",
                f"{len(m.disk)} blocks found" if m.disk else "-", m.block_bytes,
                "native" if layout.identity else "permuted")
    return m
