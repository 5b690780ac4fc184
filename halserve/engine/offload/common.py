"""What every offload tier shares: host buffers, the tier fingerprint, counters and the tier
interface.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from halserve.engine.offload import kvfile

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
