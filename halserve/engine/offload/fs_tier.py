"""The filesystem tier: one file per block under ``<dir>/<fingerprint>/``, LRU by mtime so
the order survives restarts; writes are atomic (temp file + rename) on a background thread;
a corrupt, truncated or mismatched file is a miss: removed, counted, recomputed.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from halserve.engine.offload import kvfile
from halserve.engine.offload.kvfile import FILE_SUFFIX, BadBlockFile, file_head
from halserve.engine.offload.kvfile import PREFIX as _PREFIX, TRAILER as _TRAILER
from halserve.engine.offload.common import KVTier
from halserve.engine.offload.blockfile import block_file_parts, block_rows, check_block_file, header_parts
from halserve.engine.offload.blockfile import encode_block_file

logger = logging.getLogger("halserve")


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
