"""Lookups below the device and the load jobs that bring what they find in (disk -> host ->
device while the request waits); see ``loadjob`` for a job's life.
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Callable

import numpy as np
import torch

from halserve.engine.offload import kvfile
from halserve.engine.offload.kvfile import checksum_weights
from halserve.engine.offload.blockfile import device_checksums
from halserve.engine.offload.loadjob import LoadJob, LookupResult  # noqa: F401
from halserve.engine.offload.common import host_empty

logger = logging.getLogger("halserve")


class LoadJobs:
    """Mixin of ``OffloadManager``: lookup, promotion and load jobs."""

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
