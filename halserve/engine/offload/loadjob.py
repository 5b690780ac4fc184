"""Load jobs: blocks below the device brought into device blocks that a waiting request
holds, before it runs, and what a lookup found.

A job's life (``OffloadManager`` drives it; the scheduler sees it only through the KV
connector: started at admission, polled each step, cancelled on abort)::

    start_load ──► READING ──(every block of the usable prefix read or failed)──► SENDING
                     │  blocks read so far go to the device in batches (poll, wait_pending)
                     │                                                           │
                     │                           (every upload's event done)     ▼
                     │                                                      SETTLING ─► DONE
                     │                                                     (device checks;
                     │                                                   poll returns end)
                     ├─(a copy to the device raised)──► FAILED (end = 0: all recomputed)
                     └─(cancel: request aborted)──────► CLOSED (slots released; reads still
                                                        running release their own)

``end`` only ever falls (a miss, a bad file, other tokens, a damaged block): the usable
prefix is ``got[:end]``; the request recomputes the rest. DONE, FAILED and CLOSED all close
the job (``closed``; its hashes leave the manager's index).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch


logger = logging.getLogger("halserve")


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
