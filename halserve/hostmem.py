"""Giving freed host memory back to the OS when the engine goes idle.

glibc keeps what a burst of requests freed (per-thread arenas, and a dynamic mmap threshold
that, once a large block was freed, serves later large blocks from the heap): a server's RSS
stays at its high-water mark long after the load stops, and a few large prompts leave the
process gigabytes bigger. ``malloc_trim(0)`` hands every free page of every arena back. The
engine thread calls ``trim_when_idle`` each time it runs out of work; it trims at most once
per ``min_interval`` seconds, and only after work has run since the last trim (an idle server
does not trim in a loop). No-op where the C library has no ``malloc_trim`` (musl, macOS).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

_libc = None
_tried = False


def _malloc_trim():
    global _libc, _tried
    if not _tried:
        _tried = True
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib.malloc_trim
            _libc.argtypes, _libc.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _libc = None
    return _libc


def trim() -> bool:
    """Give the C heap's free pages back to the OS now; True if the C library can."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


class IdleTrimmer:
    """``worked()`` after each step; ``idle()`` when out of work: trims once per idle period."""

    def __init__(self, min_interval: float = 2.0):
        self.min_interval = min_interval
        self._dirty = False
        self._last = 0.0
        self.trims = 0

    def worked(self) -> None:
        self._dirty = True

    def idle(self) -> None:
        now = time.monotonic()
        if self._dirty and now - self._last >= self.min_interval:
            self._dirty = False
            self._last = now
            if trim():
                self.trims += 1
