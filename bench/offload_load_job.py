"""A filesystem-tier load job on its own, without the engine around it: the time to read a
prompt's block files (page cache warm) and copy them into a device KV cache, on reader
processes and on reader threads, for a few reader counts and batch sizes. It separates the
load job's share of a filesystem hit's TTFT (``halserve bench offload``) from the engine's.

    PYTHONPATH=. python bench/offload_load_job.py [backend]    # default: the probe's choice

Env: LAYERS (32), BLOCKS (511: an 8k prompt's full blocks less one), READERS ("12,8,16"),
MODES ("processes,threads"), PUMPS ("96,256" MiB), REPEATS (4; the first is a warm-up). The
block is Llama-3-8B's: 16 tokens, 8 KV heads of 128, bf16, 2 MiB over 32 layers.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from halserve.engine.offload import kvfile
from halserve.engine.offload import KVLayout, LookupResult, OffloadManager
from halserve.hal import create, select


def env_list(name: str, default: str) -> list[str]:
    return [x for x in os.environ.get(name, default).split(",") if x]


def main() -> int:
    hal = create(sys.argv[1]) if len(sys.argv) > 1 else select()
    layers, nb = int(os.environ.get("LAYERS", 32)), int(os.environ.get("BLOCKS", 511))
    repeats = int(os.environ.get("REPEATS", 4))
    layout = KVLayout(hal, 16, 8, 128, torch.bfloat16, hal.device)
    block_bytes = 2 * layers * 16 * 8 * 128 * 2
    root = tempfile.mkdtemp(prefix="halserve-load-job-")
    hashes = [os.urandom(32) for _ in range(nb)]
    toks = [tuple(range(i * 16, i * 16 + 16)) for i in range(nb)]
    cache = torch.zeros((layers, *hal.kv_cache_shape(nb + 1, 16, 8, 128)), dtype=torch.bfloat16, device=hal.device)
    blk = None
    gib = nb * block_bytes / 2**30
    modes = [m for m in env_list("MODES", "processes,threads") if m == "threads" or kvfile.processes_supported()]
    try:
        for mode in modes:
            for readers in map(int, env_list("READERS", "12,8,16")):
                m = OffloadManager(hal, layout, layers, b"m" * 32, host_bytes=(nb + 8) * block_bytes,
                                   disk_dir=root, disk_bytes=1 << 40, io_threads=readers,
                                   io_processes=mode == "processes")
                if blk is None:  # the files, once
                    blk = torch.randn(m.block_shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
                    for h, t in zip(hashes, toks):
                        m.disk.store(h, blk, t)
                    m.disk.flush()
                    print(f"backend {hal.name}: {nb} blocks of {block_bytes / 2**20:g} MiB ({gib:.2f} GiB), "
                          f"page cache warm; device check: {m.device_check}", flush=True)
                paths = [str(m.disk.path(h)) for h in hashes]
                m.bind(cache)
                for pump in map(int, env_list("PUMPS", "96,256")):
                    m.pump_blocks = max(1, (pump << 20) // m.block_bytes)
                    times = []
                    for _ in range(repeats):
                        for p in paths:  # warm
                            with open(p, "rb") as f:
                                f.read()
                        m.host.clear()
                        res = LookupResult()
                        res.disk = list(hashes)
                        t0 = time.perf_counter()
                        job = m.start_load(list(range(1, nb + 1)), res, lambda i: toks[i])
                        while (n := m.poll(job)) is None:
                            m.wait_pending()
                        hal.synchronize()
                        times.append(time.perf_counter() - t0)
                        if n != nb:
                            raise SystemExit(f"the job loaded {n} of {nb} blocks")
                    med = statistics.median(times[1:] or times)
                    print(f"  {readers:2d} reader {mode:<9}, batches of {pump:3d} MiB: {med * 1e3:6.1f} ms "
                          f"({gib * 2**30 / med / 1e9:4.1f} GB/s; runs {', '.join(f'{t * 1e3:.0f}' for t in times)} ms)",
                          flush=True)
                m.close()
        ok = all(torch.equal(cache[:, :, b].cpu(), blk) for b in (1, nb))
        print("blocks landed intact:", ok)
        return 0 if ok else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
