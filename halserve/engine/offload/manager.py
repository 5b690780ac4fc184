"""The offload manager: the tiers in order (host, then disk) plus the device copies, for one
engine; the thin part that owns the state, with the copies (``transfers``) and the load jobs
(``loads``) in their own files. ``build_offload`` makes one from the engine's config.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import math
import os
import queue
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from halserve.engine.offload import kvfile
from halserve.engine.offload.kvfile import payload_checksum
from halserve.engine.offload.common import KVTier, _Waker, tier_fingerprint  # noqa: F401
from halserve.engine.offload.host_tier import HostMemoryTier
from halserve.engine.offload.fs_tier import FileSystemTier
from halserve.engine.offload.layout import KVLayout
from halserve.engine.offload.loadjob import LoadJob
from halserve.engine.offload.transfers import Transfers
from halserve.engine.offload.loads import LoadJobs

if TYPE_CHECKING:
    from halserve.hal.interface import Backend

logger = logging.getLogger("halserve")


class OffloadManager(Transfers, LoadJobs):
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
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * torch.empty((), dtype=self.dtype).element_size()


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
    kv_dtype = getattr(mc, "kv_dtype", None) or mc.dtype  # fp8 blocks move and are stored as fp8 bytes
    if getattr(mc, "kv_scales", ()):  # fp8 bytes read back only under the scales that wrote them
        model_fingerprint = hashlib.sha256(model_fingerprint + repr(mc.kv_scales).encode()).digest()
    layout = KVLayout(hal, config.block_size, mc.num_kv_heads, mc.head_dim, kv_dtype, device)
    host_bytes = config.kv_offload_host_bytes
    if config.kv_offload_dir and not host_bytes:
        block_bytes = 2 * mc.num_layers * layout.numel * torch.empty((), dtype=kv_dtype).element_size()
        host_bytes = landing_host_bytes(block_bytes, config.block_size,
                                        max_model_len or mc.max_position_embeddings)
        logger.info("KV offload: no host tier set; the filesystem tier reads into a %.2f GiB host tier",
                    host_bytes / 2**30)
    m = OffloadManager(hal, layout, mc.num_layers, model_fingerprint,
                       host_bytes=host_bytes, disk_dir=config.kv_offload_dir,
                       disk_bytes=config.kv_offload_disk_bytes)
    atexit.register(_flush_at_exit, weakref.ref(m))  # queued write-through lands before the process exits
    logger.info("KV offload: host %s, disk %s (%s); %d bytes a block, %s layout",
                f"{m.host.num_slots} blocks" if m.host is not None else "off",
                m.disk.dir if m.disk is not None else "off",
                f"{len(m.disk)} blocks found" if m.disk is not None else "-", m.block_bytes,
                "native" if layout.identity else "permuted")
    return m
