"""``halserve bench offload``: time to first token of one long prompt when its KV is
recomputed, loaded from the host tier, and loaded from the filesystem tier (page cache warm,
and cold: the files dropped from the page cache first), as ratios to recompute.

The model is a random-weight Llama written at bench time (safetensors + config.json, no
download, no transformers). ``--reuse-backend`` adds a row where the files written on
``--backend`` are read by another backend after a restart (e.g. written on cuda, read on
native), which is the hardware-neutral path.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RECOMPUTE = "recompute (no offload)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-len", type=int, default=8192, help="prompt tokens (default 8192)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="float32", help="model and KV dtype")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    p.add_argument("--backend", default=None, help="HAL backend (default: the probe's choice)")
    p.add_argument("--reuse-backend", default=None,
                   help="also time a restart on this backend reading the files written on --backend")
    p.add_argument("--dir", default=None, help="filesystem tier directory (default: a temp dir, removed)")
    p.add_argument("--model-dir", default=None, help="where to write the random model (default: temp)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def write_random_llama(path: Path, args, seed: int = 0) -> Path:
    """A random LlamaForCausalLM checkpoint of the bench's shape (the start-up bench's writer)."""
    from halserve.bench.startup import write_random_llama as write

    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                 max_position_embeddings=args.prompt_len + 64)
    return write(path, shape, seed=seed, num_shards=1, dtype=args.dtype)


def _drop_page_cache(root: Path, pattern: str = "*.kv") -> bool:
    """Ask the OS to forget the tier's files (no root needed: fsync, then DONTNEED)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in root.rglob(pattern):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _warm_page_cache(root: Path) -> None:
    """Read the tier's files once, so a 'page cache warm' case is warm whatever ran before."""
    for p in root.rglob("*.kv"):
        p.read_bytes()


def _process_reads(off, repeats: int) -> "tuple[float, int] | None":
    """The engine's reader processes reading the tier's files into its host tier and
    nothing else (no copy to the device; page cache warm): (best seconds, bytes), or None
    where the engine reads on threads."""
    from halserve.engine.offload import kvfile

    if off._procs is None or off.host is None:
        return None
    off.host.clear()
    hashes = list(off.disk.index)[:off.host.num_slots]
    slots = [off.host.reserve() for _ in hashes]
    try:
        tokens = [off.disk.read_into(h, off.host.slot_array(s), touch=False) for h, s in zip(hashes, slots)]
        items = [(i, h, t, s) for i, (h, t, s) in enumerate(zip(hashes, tokens, slots)) if t is not None]
        best, size = float("inf"), 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            off._procs.submit(-1, items, check=False, touch=False)
            answers = []
            while len(answers) < len(items):
                off._procs.wait(1.0)
                answers += [a for _, res, _ in off._procs.collect() for a in res]
            best = min(best, time.perf_counter() - t0)
            if any(a[1] != kvfile.OK for a in answers):
                raise RuntimeError("the reader processes could not read the tier's files")
            size = sum(a[3] for a in answers)
        return best, size
    finally:
        off.host.release(*slots)


def _ceilings(llm, tier_dir: Path, kv_bytes: int, repeats: int = 3) -> dict[str, float]:
    """What a hit cannot beat here: the host->device copy bandwidth from the host tier's kind
    of buffer (pinned where the backend asks), and the rate the engine's readers read the
    tier's files (page cache warm, no checks): its reader processes, else as many threads."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from halserve.engine.offload import host_empty

    eng = llm.engine
    hal, dev = eng.hal, eng.runner.kv_caches[0].device
    src = host_empty(hal, (kv_bytes,), torch.uint8)
    src.fill_(1)
    dst = torch.empty(kv_bytes, dtype=torch.uint8, device=dev)
    copy = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        hal.synchronize()
        copy.append(time.perf_counter() - t0)
    del dst
    procs = _process_reads(eng.connector.manager, repeats)
    if procs is not None:
        best, size = procs
        return {"copy_gbps": kv_bytes / min(copy) / 1e9, "read_gbps": size / best / 1e9,
                "copy_s": min(copy), "read_s": best * kv_bytes / size,
                "readers": f"{eng.connector.manager.io_threads} reader processes"}
    files = sorted(tier_dir.rglob("*.kv"))[:max(1, kv_bytes // eng.connector.manager.block_bytes)]
    size = files[0].stat().st_size
    buf = host_empty(hal, (len(files), size), torch.uint8)

    def read(i):
        with open(files[i], "rb", buffering=0) as f:
            return os.preadv(f.fileno(), [memoryview(buf[i].numpy())], 0)

    reads = []
    with ThreadPoolExecutor(eng.connector.manager.io_threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            sum(pool.map(read, range(len(files))))
            reads.append(time.perf_counter() - t0)
    return {"copy_gbps": kv_bytes / min(copy) / 1e9, "read_gbps": len(files) * size / min(reads) / 1e9,
            "copy_s": min(copy), "read_s": min(reads) * kv_bytes / (len(files) * size),
            "readers": f"{eng.connector.manager.io_threads} threads"}


def _free_device_memory() -> None:
    """Let a dropped engine's device memory go before the next engine sizes its KV cache."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ttft(llm, prompt) -> tuple[float, list[int], int]:
    from halserve import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([prompt], sp)[0]
    return time.perf_counter() - t0, out.outputs[0].token_ids, out.num_cached_tokens


def main(args: argparse.Namespace) -> int:
    import torch

    from halserve import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="halserve-bench-offload-"))
    model = Path(args.model_dir) if args.model_dir else tmp / "model"
    tier_dir = Path(args.dir) if args.dir else tmp / "kv"
    try:
        t0 = time.perf_counter()
        write_random_llama(model, args)
        print(f"random llama: {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, "
              f"{args.dtype}, written in {time.perf_counter() - t0:.1f}s")
        common = dict(dtype=args.dtype, block_size=args.block_size,
                      max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=4)
        kv_bytes = 2 * args.layers * args.kv_heads * (args.hidden // args.heads) * args.prompt_len * (
            4 if args.dtype in ("float32", "fp32") else 2)
        host_bytes = kv_bytes * (args.repeats + 2)  # every timed prompt stays in the host tier
        base = 1000

        def prompt(i):  # distinct prompts: nothing is shared between timed runs by accident
            return [(base + 7919 * i + 31 * t) % (args.vocab - 3) + 3 for t in range(args.prompt_len)]

        rows: dict[str, list[float]] = {}
        disk_bytes = kv_bytes * (args.repeats + 2) * 2

        def timed(name, llm, r):
            dt, toks, cached = _ttft(llm, prompt(r))
            rows.setdefault(name, []).append(dt)
            print(f"  {name}, run {r + 1}: {dt:.3f}s ({cached} tokens cached)", flush=True)
            return toks, cached

        # the baseline: the same engine with no offload at all
        llm = LLM(str(model), backend=args.backend, **common)
        backend = llm.engine.hal.name
        _ttft(llm, prompt(10_000)[:256])  # warm-up
        ref: dict[int, list[int]] = {}
        for r in range(args.repeats):
            ref[r], cached = timed(RECOMPUTE, llm, r)
            assert cached == 0
        del llm
        _free_device_memory()

        llm = LLM(str(model), backend=args.backend, kv_offload_host_bytes=host_bytes,
                  kv_offload_dir=str(tier_dir), kv_offload_disk_bytes=disk_bytes, **common)
        _ttft(llm, prompt(10_000)[:256])  # warm-up
        for r in range(args.repeats):
            toks, cached = timed("recompute, offload on (writes the blocks through)", llm, r)
            assert cached == 0 and toks == ref[r], (cached, toks, ref[r])
            # let the files land: a burst of long prompts can outrun the disk writer, which then
            # skips blocks (see FileSystemTier.MAX_QUEUED_BYTES) and the restarts below would
            # find a shorter prefix on disk
            llm.engine.connector.manager.flush()
        for r in range(args.repeats):
            llm.engine.kv.reset_prefix_cache()  # drop the device copy: the host tier must serve it
            toks, cached = timed("host tier hit", llm, r)
            assert toks == ref[r] and cached > 0, (toks, ref[r], cached)
        stats_host = llm.get_metrics()["offload"]
        llm.engine.connector.manager.close()
        del llm
        _free_device_memory()

        ceil: dict[str, float] = {}

        def restart(name, backend_name, cold, host=True, measure=False):
            """A new engine over the same directory: the blocks are on disk only (a host tier,
            when set, starts empty and is where disk reads land)."""
            llm = LLM(str(model), backend=backend_name, kv_offload_dir=str(tier_dir),
                      kv_offload_disk_bytes=disk_bytes, kv_offload_host_bytes=host_bytes if host else 0,
                      **common)
            _ttft(llm, prompt(10_001)[:256])
            # the checkpoint was read once, at load: its pages would only crowd the tier's
            # files out of the page cache where memory is tight
            _drop_page_cache(model, "*.safetensors")
            for r in range(args.repeats):
                if cold:
                    _drop_page_cache(tier_dir)
                else:
                    _warm_page_cache(tier_dir)
                if llm.engine.connector.manager.host is not None:
                    llm.engine.connector.manager.host.clear()  # only the files may serve it
                toks, cached = timed(name, llm, r)
                assert toks == ref[r] and cached > 0, (toks, ref[r], cached)
                llm.engine.kv.reset_prefix_cache()
            stats = llm.get_metrics()["offload"]
            if measure:
                ceil.update(_ceilings(llm, tier_dir, kv_bytes))
            llm.engine.connector.manager.close()
            del llm
            _free_device_memory()
            return stats

        stats_disk = restart("filesystem tier hit (page cache warm)", args.backend, cold=False,
                             measure=True)
        restart("filesystem tier hit, only a directory set (page cache warm)", args.backend, cold=False, host=False)
        restart("filesystem tier hit (page cache dropped)", args.backend, cold=True)
        if args.reuse_backend:
            restart(f"filesystem tier hit on {args.reuse_backend} (written on {backend})",
                    args.reuse_backend, cold=False)

        rec = statistics.median(rows[RECOMPUTE])
        machine = f"{platform.machine()} {platform.processor() or ''}".strip()
        print(f"\nTTFT, {args.prompt_len}-token prompt, backend {backend}, {os.cpu_count()} cpus ({machine}), "
              f"{torch.get_num_threads()} torch threads, "
              f"median of {args.repeats}; KV {kv_bytes / 2**20:.1f} MiB")
        # the floors: a hit must at least move the KV to the device, and, from disk, read it
        # (the reads and the copies overlap: the slower of the two)
        floors = {"host tier hit": ceil["copy_s"]}
        fs_floor = max(ceil["copy_s"], ceil["read_s"])
        for name in rows:
            if name.startswith("filesystem") and " on " not in name:
                floors[name] = fs_floor
        print(f"host->device copy {ceil['copy_gbps']:.1f} GB/s, file reads {ceil['read_gbps']:.1f} GB/s "
              f"({ceil['readers']}, page cache warm): a host hit's floor is {ceil['copy_s'] * 1e3:.1f} ms, "
              f"a filesystem hit's {fs_floor * 1e3:.1f} ms")
        print(f"{'case':<58} {'TTFT s':>9} {'speed-up':>9} {'floor/TTFT':>11}")
        result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "backend": backend, "prompt_len": args.prompt_len,
                  "kv_mib": kv_bytes / 2**20, "ceilings": ceil, "cases": {}}
        for name, v in rows.items():
            med = statistics.median(v)
            fl = floors.get(name)
            print(f"{name:<58} {med:>9.3f} {rec / med:>8.1f}x {'' if fl is None else f'{fl / med:>10.0%}'}")
            result["cases"][name] = {"ttft_s": med, "speedup_vs_recompute": rec / med, "runs": v,
                                     **({"floor_s": fl, "floor_over_ttft": fl / med} if fl else {})}
        print(f"\nhost tier: {stats_host['host']['hits']} block hits, "
              f"{stats_host['bytes_to_device'] / 2**20:.0f} MiB to device in {stats_host['load_count']} copy-ins, "
              f"{stats_host['load_seconds'] / max(1, stats_host['load_count']) * 1e3:.1f} ms each; "
              f"disk tier (restart): {stats_disk['disk']['hits']} hits, "
              f"{stats_disk['disk']['load_seconds']:.2f}s reading, bad files {stats_disk['bad_files']}, "
              f"{stats_disk['load_jobs_done']} load jobs of "
              f"{stats_disk['load_job_seconds'] / max(1, stats_disk['load_jobs_done']) * 1e3:.1f} ms each "
              f"(start to every block on the device; the rest of a filesystem hit's TTFT is the engine's)")
        result["disk_load_job_s"] = stats_disk["load_job_seconds"] / max(1, stats_disk["load_jobs_done"])
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
