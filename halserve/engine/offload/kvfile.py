"""KV block files, and the reader processes that read them for load jobs.

A block file is head | payload | trailer: the head is magic, version, header length and a
JSON header (fingerprint, block hash, dtype, shape, tokens); the payload is the block's
bytes, a layer a piece; the trailer is a CRC32 of the head and ``payload_checksum``.
``offload.blockfile`` writes and parses them; this module holds what a reader needs
to read one whose head it knows, and nothing that imports torch: a reader process runs
this file as a script, with the standard library and numpy alone.

Why processes: a load job reads a long prompt's blocks (a GiB for 8k tokens of an 8B
model) on a dozen readers. As threads they share the engine's GIL, and each torch call
the engine thread makes while they run (queueing the copies of the blocks read so far)
waits its turn behind them, and they behind it: on a 16-core host a GiB took twice as
long inside the engine as alone. A reader process has its own interpreter; it reads
straight into the host tier, which lives in shared memory (``os.memfd_create``), and
sends back a few bytes a block.
"""
from __future__ import annotations

import collections
import logging
import mmap
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
import zlib
from multiprocessing.connection import Connection

import numpy as np

logger = logging.getLogger("halserve")

MAGIC = b"HSKVBLK\x00"
VERSION = 3  # 3: CRC32 of the head + payload_checksum; 2: a CRC32 of it all; 1: [2, layers, ...]
PREFIX = struct.Struct("<8sHI")  # magic, version, header length
TRAILER = struct.Struct("<IQ")  # CRC32 of the head, payload_checksum
FILE_SUFFIX = ".kv"


class BadBlockFile(Exception):
    """A block file that must not be used; the message says why."""


_WEIGHTS: dict[tuple[int, int], np.ndarray] = {}


def checksum_weights(layers: int, row_bytes: int) -> np.ndarray:
    """``payload_checksum``'s weights, 2k + 1 for word k, ``[layers, row_bytes // 8]`` uint64."""
    if row_bytes % 8:
        raise ValueError(f"KV block layer piece of {row_bytes} bytes is not a whole number of 64-bit words")
    w = _WEIGHTS.get((layers, row_bytes))
    if w is None:
        w = _WEIGHTS[(layers, row_bytes)] = (np.arange(layers * (row_bytes // 8), dtype=np.uint64) * 2 + 1
                                             ).reshape(layers, -1)
    return w


def payload_checksum(rows: np.ndarray) -> int:
    """The payload check of a block file: the block's bytes (``[layers, layer_bytes]``, rows
    contiguous) as little-endian 64-bit words w_k in file order, sum of w_k * (2k + 1)
    modulo 2**64. A position-weighted sum, like Fletcher's or Adler's rather than a CRC: any
    change of a single word changes it (the weights are odd), as does, but for chance
    (2**-64), any random damage; it is one pass of multiply-adds (``np.einsum``, which runs
    without the GIL), many times faster than zlib's CRC32, so the readers can check a
    prompt's blocks as fast as the page cache hands them over."""
    return int(np.einsum("ij,ij->", rows.view("<u8"), checksum_weights(*rows.shape)))


def file_head(prefix: bytes, tokens: "tuple[int, ...] | list[int]") -> bytes:
    """A block file's head (magic, version, header length, JSON header) from its header's
    prefix (everything before the tokens) and the block's tokens (JSON as ``json.dumps``
    writes it, no spaces)."""
    header = prefix + b",".join(b"%d" % t for t in tokens) + b"]}"
    return PREFIX.pack(MAGIC, VERSION, len(header)) + header


def block_path(root: str, h: bytes) -> str:
    """Where block ``h``'s file lives under a tier's directory ``root``."""
    x = h.hex()
    return f"{root}/{x[:2]}/{x}{FILE_SUFFIX}"


def read_expected(path: str, head: bytes, rows: np.ndarray, bufs: list, check: bool) -> "tuple[int, int] | None":
    """Read the block file ``path`` whose head should be ``head``: one ``preadv`` (head,
    the payload straight into ``bufs``, the layer pieces of ``rows``, trailer, and a spare
    byte that catches a longer file), the head compared as bytes, its CRC checked and
    (``check``) the payload's. Returns (payload checksum, file size), or None when the file
    is not exactly what was expected (short, long, another head): the caller then reads it
    the general way, which says what is wrong. Raises BadBlockFile for a damaged file and
    OSError (FileNotFoundError: it went) for one that cannot be read."""
    got_head, trailer, extra = bytearray(len(head)), bytearray(TRAILER.size), bytearray(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = os.preadv(fd, [got_head, *bufs, trailer, extra], 0)
    finally:
        os.close(fd)
    size = len(head) + rows.nbytes + TRAILER.size
    if got != size or got_head != head:
        return None
    head_crc, payload_sum = TRAILER.unpack(trailer)
    if zlib.crc32(head) != head_crc:
        raise BadBlockFile("header checksum mismatch")
    if check and payload_checksum(rows) != payload_sum:
        raise BadBlockFile("payload checksum mismatch")
    return payload_sum, size


# ---- reader processes ------------------------------------------------------------------------------

# what a reader says about each block: read and checked; not the file expected (read it the
# general way); no such file; a damaged file (message); unreadable (message); and, said for
# it, the reader died before it answered (read it again another way)
OK, OTHER, MISSING, BAD, UNREADABLE, LOST = range(6)
_F_SETPIPE_SZ = 1031  # Linux fcntl: a pipe's buffer size
PIPE_BYTES = 1 << 20  # asked for each reader's pipes: a long prompt's share goes in one write


def processes_supported() -> bool:
    """Reader processes need shared memory by file descriptor and ``preadv`` (Linux)."""
    return (sys.platform.startswith("linux") and hasattr(os, "memfd_create") and hasattr(os, "preadv")
            and bool(sys.executable))


def shared_buffer(nbytes: int, name: str) -> tuple[int, mmap.mmap]:
    """``nbytes`` of memory that reader processes can map: (file descriptor, mapping)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        return fd, mmap.mmap(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise


def _reader_main(argv: list[str]) -> None:
    """A reader process: ``kvfile.py --reader SHM_FD RX_FD TX_FD``. The first message says
    where the tier's files are, their header and the host pool's geometry; each next one is
    a load job's share: (job id, check the payload?, touch the files?, runs of blocks (index,
    hash, tokens, host slot)). Each block is read straight into its slot, and each run's
    results go back as one message: (job id, [(index, status, payload checksum, size,
    message)], seconds). Files read are touched (their mtime is the LRU order a restart
    reads back) after the job's share is read. Exits when the engine closes the pipe (or
    dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle; EOF stops us
    shm_fd, rx_fd, tx_fd = map(int, argv)
    rx, tx = Connection(rx_fd, writable=False), Connection(tx_fd, readable=False)
    init = rx.recv()
    layers, slots, layer_bytes = init["pool"]
    root, a, b = init["root"], init["head"][0], init["head"][1]
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # page tables now, not on the first job
    mm = mmap.mmap(shm_fd, layers * slots * layer_bytes, flags=flags)
    pool = np.frombuffer(mm, dtype=np.uint8).reshape(layers, slots, layer_bytes)
    tx.send("ready")
    while True:
        try:
            job_id, check, touch, runs = rx.recv()
        except EOFError:
            return
        done = []
        for run in runs:
            t0 = time.perf_counter()
            out = []
            for i, h, tokens, slot in run:
                path = block_path(root, h)
                rows = pool[:, slot]
                try:
                    got = read_expected(path, file_head(a + h.hex().encode() + b, tokens), rows, list(rows), check)
                    if got is None:
                        out.append((i, OTHER, 0, 0, ""))
                    else:
                        out.append((i, OK, got[0], got[1], ""))
                        done.append(path)
                except FileNotFoundError:
                    out.append((i, MISSING, 0, 0, ""))
                except BadBlockFile as e:
                    out.append((i, BAD, 0, 0, str(e)))
                except OSError as e:
                    out.append((i, UNREADABLE, 0, 0, str(e)))
            tx.send((job_id, out, time.perf_counter() - t0))
        if touch:
            for path in done:
                try:
                    os.utime(path)
                except OSError:
                    pass


def wait_fds(readable: list[int], writable: list[int], timeout: float) -> None:
    """Until one of ``readable`` can be read or one of ``writable`` written, at most
    ``timeout`` s (``poll``: ``select`` fails on a descriptor past 1023)."""
    p = select.poll()
    for fd in readable:
        p.register(fd, select.POLLIN)
    for fd in writable:
        p.register(fd, select.POLLOUT)
    try:
        p.poll(max(0, int(timeout * 1000)))
    except InterruptedError:
        pass


class ReaderProcesses:
    """``n`` reader processes (``_reader_main``) over a tier's directory, reading into a
    host pool ``[layers, slots, layer_bytes]`` in shared memory (``shm_fd``).

    ``submit`` deals a job's blocks out in runs of ``run`` blocks, round robin, so the
    readers go through a prompt about in order; ``collect`` returns the results that have
    come back (each reader answers its runs in order). Nothing here blocks on a reader:
    what a reader's pipe has no room for yet waits in its outbox, sent on at each
    ``collect`` (a reader whose answers nobody reads stops reading, and a blocking write
    to it would then wait forever). A reader that dies answers its outstanding blocks LOST
    (the caller reads them again another way) and is started again at the next ``submit``.
    Thread-safe."""

    def __init__(self, n: int, shm_fd: int, pool: tuple[int, int, int], root: str,
                 head: tuple[bytes, bytes], run: int = 4):
        self.n, self.run = n, run
        self._shm_fd = shm_fd
        self._init = {"pool": pool, "root": root, "head": head}
        self._lock = threading.RLock()
        self.procs: list = [None] * n
        self.tx: list = [None] * n  # the write end of each reader's input pipe (a non-blocking fd)
        self.rx: list = [None] * n  # each reader's answers (a Connection)
        self.outbox = [bytearray() for _ in range(n)]  # framed messages not yet written to tx
        self.pending = [collections.deque() for _ in range(n)]  # per reader: (job id, block indices) of each run sent
        self.ready = [False] * n  # the reader has mapped the pool (its first answer says so)
        self._next = 0  # the reader the next job starts on
        self.restarts = 0
        self.closed = False
        self._finalizer = weakref.finalize(self, _stop_readers, self.procs, self.tx, self.rx)
        try:
            for c in range(n):
                self._spawn(c)
        except BaseException:
            self._finalizer()
            raise

    def _spawn(self, c: int) -> None:
        r1, w1 = os.pipe()
        try:
            r2, w2 = os.pipe()
        except BaseException:
            os.close(r1)
            os.close(w1)
            raise
        for fd in (w1, w2):
            try:  # refused past the user's pipe quota: then 64 KiB, or a page
                import fcntl

                fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
            except (OSError, ImportError):
                pass
        cmd = [sys.executable]
        if sys.version_info >= (3, 11):
            cmd.append("-P")  # not this package's directory first on sys.path
        cmd += [os.path.abspath(__file__), "--reader", str(self._shm_fd), str(r1), str(w2)]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(self._shm_fd, r1, w2), stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (r1, w1, r2, w2):
                os.close(fd)
            raise
        os.close(r1)  # the reader's ends
        os.close(w2)
        os.set_blocking(w1, False)
        self.procs[c] = proc
        self.ready[c] = False
        self.tx[c] = w1
        self.rx[c] = Connection(r2, writable=False)
        self.outbox[c].clear()
        self._post(c, self._init)

    def _post(self, c: int, msg) -> None:
        """Queue ``msg`` for reader ``c`` (framed as ``Connection.recv`` reads it) and send
        what its pipe has room for. OSError: the reader is gone."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self.outbox[c] += (struct.pack("!i", len(data)) if len(data) < 0x7FFFFFFF
                           else struct.pack("!iQ", -1, len(data)))
        self.outbox[c] += data
        self._flush(c)

    def _flush(self, c: int) -> None:
        box = self.outbox[c]
        while box:
            try:
                n = os.write(self.tx[c], box)
            except BlockingIOError:  # full: the rest goes at the next collect
                return
            del box[:n]

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Wait until every reader has started and mapped the pool (its page tables made up
        front: a first read then runs at full speed). False if one did not in ``timeout`` s."""
        end = time.monotonic() + timeout
        while not all(self.ready):
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.wait(min(left, 1.0))
            for msg in self.collect():  # no job runs yet: only "ready" (or a lost reader's nothing)
                logger.warning("KV offload: unexpected reader answer before any job: %r", msg[:1])
            if any(rx is None for rx in self.rx):
                return False
        return True

    def busy(self) -> bool:
        """Some blocks sent are not answered yet."""
        return any(self.pending)

    def submit(self, job_id: int, blocks: list[tuple[int, bytes, tuple[int, ...], int]], check: bool,
               touch: bool) -> list[tuple]:
        """Read ``blocks`` (index, hash, tokens, host slot) for job ``job_id``. Returns the
        answers of readers found dead meanwhile (as ``collect``), this job's blocks among
        them (LOST) if its reader died right away or no reader is alive and none could be
        started (nor any after ``close``)."""
        with self._lock:
            lost = []
            if self.closed:
                return [(job_id, [(i, LOST, 0, 0, "the readers are closed") for i, *_ in blocks], 0.0)]
            for c in range(self.n):
                if self.rx[c] is not None and self.procs[c].poll() is not None:  # exited while idle
                    lost += self._lost(c)
                if self.rx[c] is None:
                    try:
                        self._spawn(c)
                        self.restarts += 1
                    except OSError as e:
                        logger.warning("KV offload: cannot start reader process %d: %s", c, e)
                        if self.rx[c] is not None:
                            self._lost(c)
            live = [c for c in range(self.n) if self.rx[c] is not None]
            if not live:
                logger.warning("KV offload: no reader process is running; this job's disk reads run on threads")
                return lost + [(job_id, [(i, LOST, 0, 0, "no reader process") for i, *_ in blocks], 0.0)]
            runs = [blocks[k:k + self.run] for k in range(0, len(blocks), self.run)]
            share: dict[int, list] = {c: [] for c in live}
            for k, r in enumerate(runs):
                share[live[(self._next + k) % len(live)]].append(r)
            self._next = (self._next + len(runs)) % len(live)
            for c, rs in share.items():
                if not rs:
                    continue
                self.pending[c].extend((job_id, [i for i, *_ in r]) for r in rs)
                try:
                    self._post(c, (job_id, check, touch, rs))
                except OSError:
                    lost += self._lost(c)
            return lost

    def wait(self, timeout: float, also=()) -> None:
        """Until a reader with work (or not yet ready) answers, one with queued input can take
        more, or one of ``also`` (objects with ``fileno``) is readable; at most ``timeout`` s.
        An idle reader's pipe is left out: it only says something if it died, which the next
        ``submit`` finds."""
        with self._lock:  # another thread's collect may close a lost reader's pipes meanwhile
            live = [c for c in range(self.n) if self.rx[c] is not None]
            readable = [self.rx[c].fileno() for c in live if self.pending[c] or not self.ready[c]]
            writable = [self.tx[c] for c in live if self.outbox[c]]
        # a pipe closed since answers POLLNVAL: back at once, and the caller looks again
        wait_fds(readable + [obj.fileno() for obj in also], writable, timeout)

    def collect(self) -> list[tuple]:
        """Send on what waits in the outboxes, and return the answers that came back:
        (job id, [(index, status, payload checksum, size, message)], seconds) each."""
        with self._lock:
            out = []
            if not (any(self.pending) or any(self.outbox)
                    or not all(r for r, rx in zip(self.ready, self.rx) if rx is not None)):
                return out  # nothing owed (an idle reader that died is found at the next submit)
            for c in range(self.n):
                if self.rx[c] is None:
                    continue
                try:
                    self._flush(c)
                    rx = self.rx[c]
                    while rx.poll():
                        msg = rx.recv()
                        if msg == "ready":
                            self.ready[c] = True
                            continue
                        self.pending[c].popleft()
                        out.append(msg)
                except (EOFError, OSError):
                    out += self._lost(c)
            return out

    def _lost(self, c: int) -> list[tuple]:
        """Reader ``c`` died (or its pipe broke): its outstanding blocks come back LOST."""
        with self._lock:
            code = self.procs[c].poll() if self.procs[c] is not None else None
            logger.warning("KV offload: reader process %d stopped (exit code %s); its reads are done "
                           "again on threads, and it is started again",
                           self.procs[c].pid if self.procs[c] else -1, code)
            _stop_readers([self.procs[c]], [self.tx[c]], [self.rx[c]], timeout=0)
            self.procs[c] = self.tx[c] = self.rx[c] = None
            self.outbox[c].clear()
            lost = [(job_id, [(i, LOST, 0, 0, "the reader process stopped") for i in idx], 0.0)
                    for job_id, idx in self.pending[c]]
            self.pending[c].clear()
            return lost

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._finalizer()


def _stop_readers(procs, tx, rx, timeout: float = 10) -> None:
    """Close the readers' input (each exits once its current share is read), wait for them
    all ``timeout`` s in all, then kill those still running. The lists' entries become
    None (a closed descriptor's number is soon someone else's)."""
    for k, fd in enumerate(tx):
        tx[k] = None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    end = time.monotonic() + timeout
    for k, p in enumerate(procs):
        procs[k] = None
        if p is None:
            continue
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for k, conn in enumerate(rx):
        rx[k] = None
        if conn is not None:
            conn.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--reader"]:
    _reader_main(sys.argv[2:])
