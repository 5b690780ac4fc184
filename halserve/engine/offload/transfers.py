"""Block moves between the device and the host tier (a layer at a time through a device
staging buffer and ``swap_blocks``, on the HAL's copy stream), and write-through saves.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
import time
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch
from halserve.engine.offload.common import _noop  # noqa: F401
from halserve.engine.offload.common import host_empty


if TYPE_CHECKING:
    from halserve.hal.interface import Backend

logger = logging.getLogger("halserve")


class Transfers:
    """Mixin of ``OffloadManager``: device <-> host copies and write-through."""

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
        that reads layer l waits on it (the runner hands the model ``kv_connector.LayerWaits``); without, they
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
