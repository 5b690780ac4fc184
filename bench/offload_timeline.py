"""Where a filesystem-tier hit's TTFT goes, beside its load job: a restart over a directory
written by a first engine, then three hits (and then three host-tier hits), each with a timeline of the engine's functions
(calls, total time, first start, last end, from the request's start).

    PYTHONPATH=. python bench/offload_timeline.py [backend]      # SMALL=1: a tiny model

The KV is Llama-3-8B's (32 layers, 8 KV heads of 128, 8192 tokens: 1 GiB) but the MLP is
thin (intermediate 1024), so the random model writes in seconds; the load and the engine's
work around it are the 8B's, the recompute is not.
"""
import argparse
import functools
import gc
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from halserve import LLM, SamplingParams
from halserve.bench.offload import write_random_llama, _warm_page_cache
a = argparse.Namespace(hidden=4096, intermediate=1024, layers=32, heads=32, kv_heads=8, vocab=4096, prompt_len=8192, dtype="bfloat16")
if os.environ.get("SMALL"):
    a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.prompt_len = 256, 512, 4, 4, 2, 1024
tmp = Path(tempfile.mkdtemp()); kvdir = tmp / "kv"
t0 = time.perf_counter(); write_random_llama(tmp / "m", a); print(f"model {time.perf_counter()-t0:.1f}s", flush=True)
kv = 2 * a.layers * a.kv_heads * (a.hidden // a.heads) * a.prompt_len * 2
be = sys.argv[1] if len(sys.argv) > 1 else None
common = dict(backend=be, dtype="bfloat16", block_size=16, max_num_batched_tokens=4096, max_num_seqs=4,
              kv_offload_dir=str(kvdir), kv_offload_disk_bytes=kv * 12, kv_offload_host_bytes=kv * 5)
sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
def prompt(i): return [(1000 + 7919 * i + 31 * t) % (a.vocab - 3) + 3 for t in range(a.prompt_len)]
llm = LLM(str(tmp / "m"), **common)
for r in range(3):
    t0 = time.perf_counter(); llm.generate([prompt(r)], sp); print(f"recompute {r}: {(time.perf_counter()-t0)*1e3:.1f} ms", flush=True)
    llm.engine.connector.manager.flush()
llm.engine.connector.manager.close(); del llm
gc.collect()
if torch.cuda.is_available():
    torch.cuda.empty_cache()
llm = LLM(str(tmp / "m"), **common)
llm.generate([prompt(99)[:256]], sp)
eng = llm.engine; off = eng.connector.manager
agg = defaultdict(lambda: [0, 0.0, 1e9, 0.0]); T0 = [0.0]
def wrap(obj, nm):
    f = getattr(obj, nm)
    @functools.wraps(f)
    def w(*x, **k):
        s = time.perf_counter(); r = f(*x, **k); e = time.perf_counter()
        g = agg[nm]; g[0] += 1; g[1] += e - s; g[2] = min(g[2], s - T0[0]); g[3] = max(g[3], e - T0[0]); return r
    setattr(obj, nm, w)
for o, names in ((eng, ["add_request", "step"]), (eng.scheduler, ["schedule", "_finish_loads", "_start_load"]),
                 (eng.kv, ["match_prefix", "register_loaded", "free"]), (eng.runner, ["execute"]),
                 (off, ["lookup", "start_load", "poll", "wait_pending", "_collect", "_settle", "_pump", "_send_checked", "_close", "save_pending"])):
    for nm in names: wrap(o, nm)
rd = []  # when reads came back: read tasks on threads, answers from reader processes
for nm in ("_read_for", "_land"):
    def track(*x, _f=getattr(off, nm), **k):
        r = _f(*x, **k); rd.append(time.perf_counter() - T0[0]); return r
    setattr(off, nm, track)
for r in range(3):
    _warm_page_cache(kvdir); off.host.clear(); agg.clear(); rd.clear()
    T0[0] = time.perf_counter()
    out = llm.generate([prompt(r)], sp)[0]
    dt = time.perf_counter() - T0[0]
    print(f"--- fs hit {r}: {dt*1e3:.1f} ms cached {out.num_cached_tokens}; last read in {max(rd, default=0)*1e3:.1f} ms; readers: {'processes' if off._procs else 'threads'}")
    for nm, (c, tot, first, last) in sorted(agg.items(), key=lambda kv: kv[1][2]):
        print(f"   {nm:<16} x{c:<4} total {tot*1e3:7.2f} ms  first start {first*1e3:7.2f}  last end {last*1e3:7.2f}")
    eng.kv.reset_prefix_cache()
# then host-tier hits: the last filesystem hit's prompt is in the host tier (each hit above
# emptied it first)
for o, names in ((eng.kv, ["update_hashes"]), (eng.runner, ["_prepare"]), (off, ["scatter", "loads_done", "release"])):
    for nm in names: wrap(o, nm)
for r in range(3):
    eng.kv.reset_prefix_cache(); agg.clear()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    T0[0] = time.perf_counter()
    out = llm.generate([prompt(2)], sp)[0]
    dt = time.perf_counter() - T0[0]
    print(f"--- host hit {r}: {dt*1e3:.1f} ms cached {out.num_cached_tokens}")
    for nm, (c, tot, first, last) in sorted(agg.items(), key=lambda kv: kv[1][2]):
        print(f"   {nm:<16} x{c:<4} total {tot*1e3:7.2f} ms  first start {first*1e3:7.2f}  last end {last*1e3:7.2f}")
shutil.rmtree(tmp, ignore_errors=True)
