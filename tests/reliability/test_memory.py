"""Host memory comes back after a burst: a server's RSS after a burst of long prompts,
once idle, stays near its warmed-up baseline (issue 16: a few large prompts left the process
gigabytes bigger for good). The engine thread trims the C heap when it runs out of work
(halserve/hostmem.py). The rest that a CPU server used to keep, oneDNN's GEMM primitives, is
capped (halserve/__init__.py), and the KV cache is resident from the start (the baseline).
"""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from halserve import SamplingParams
from halserve.engine.llm import AsyncLLM

# wide enough that one prefill chunk's activations are ~100 MB: what glibc would keep
WIDE = dict(hidden_size=256, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)


# Run in a fresh interpreter: in a process that has run the rest of the suite, earlier tests'
# allocations and GEMM primitives move RSS by tens of MB on their own.
_BURST = r"""
import asyncio, json, re, sys, time
from pathlib import Path
from halserve import SamplingParams
from halserve.engine.llm import AsyncLLM

def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

llm = AsyncLLM(sys.argv[1], dtype="float32", max_model_len=4096, max_num_batched_tokens=8192, max_num_seqs=16,
               kv_cache_memory=64 << 20)

async def one(rid, n, seed):
    ids = [(seed * 7919 + i * 31) % 500 + 3 for i in range(n)]
    async for _ in llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2), rid):
        pass

async def burst(tag, n, count):
    await asyncio.gather(*(one(f"{tag}{i}", n, i) for i in range(count)))

try:
    asyncio.run(burst("warm", 16, 2))  # a short request: the serving baseline
    time.sleep(4.0)  # the engine thread trims within its next idle poll (0.5 s)
    base, peaks = rss_mb(), []
    for r in range(2):
        asyncio.run(burst(f"b{r}-", 2000, 4))
        peaks.append(rss_mb())
        time.sleep(4.0)
    after = rss_mb()
finally:
    llm.shutdown()
print(json.dumps({"base": base, "peaks": peaks, "after": after, "trims": llm._trimmer.trims}))
"""


def test_rss_returns_near_baseline_after_a_burst_of_long_prompts(checkpoint):
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", _BURST, str(checkpoint("llama", **WIDE))], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["trims"] >= 3
    # 8 prompts of 2,000 tokens went through (transient activations of ~100 MB a chunk, kept
    # for good by glibc before the fix: +180 MB here). The KV cache was resident before the
    # burst (test_kv_cache_is_resident_from_the_start); what may stay is a little: the GEMM
    # primitives of the new prefill shapes, allocator slack (measured +18 to +21 MB; +59 MB
    # without the trim).
    print(f"RSS base {r['base']:.0f} MB, after each burst {r['peaks']}, idle after {r['after']:.0f} MB")
    assert r["after"] - r["base"] < 40, r


# torch first, as a user's program may do: halserve's defaults must still be in time (both
# capacities are read at the first GEMM, not when torch loads)
_MANY_SHAPES = r"""
import json, os, re, sys
import torch
import torch.nn.functional as F
import halserve
from halserve import hostmem

def rss():
    return int(re.search(r"VmRSS:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

ws = [torch.randn(n, 64, dtype=torch.bfloat16) for n in (64, 128, 192)]
F.linear(torch.randn(9, 64, dtype=torch.bfloat16), ws[0])
hostmem.trim()
base = rss()
for m in range(9, 9 + 400):  # 1,200 (M, N, K): what a server meets in batch and prefill sizes
    x = torch.randn(m, 64, dtype=torch.bfloat16)
    for w in ws:
        F.linear(x, w)
hostmem.trim()
print("RESULT " + json.dumps({"growth_mb": rss() - base,
                              "caps": [os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                                       os.environ.get("LRU_CACHE_CAPACITY")]}))
"""


def _shapes_run(caps: str | None) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    if caps is not None:
        env.update(ONEDNN_PRIMITIVE_CACHE_CAPACITY=caps, LRU_CACHE_CAPACITY=caps)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    p = subprocess.run([sys.executable, "-c", _MANY_SHAPES], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(re.search(r"^RESULT (.*)$", p.stdout, re.M).group(1))


def test_gemm_primitive_caches_are_bounded_by_default():
    """oneDNN builds and keeps one GEMM primitive per (M, N, K), ~0.65 MB each, 1,024 of them by
    default in each of two caches (oneDNN's and ideep's): a CPU server that met many batch and
    prefill sizes stayed ~600 MB bigger for good (docs/reliability.md, run 3). halserve caps
    both at 512 unless the user set them; a user's value wins."""
    mine = _shapes_run(None)
    theirs = _shapes_run("1024")
    print(f"1,200 GEMM shapes: +{mine['growth_mb']:.0f} MB with halserve's caps {mine['caps']}, "
          f"+{theirs['growth_mb']:.0f} MB with 1024")
    assert mine["caps"] == ["512", "512"] and theirs["caps"] == ["1024", "1024"]
    if theirs["growth_mb"] < 100:
        pytest.skip(f"this torch keeps no sizeable per-shape GEMM primitives "
                    f"(+{theirs['growth_mb']:.0f} MB for 1,200 shapes at 1024): nothing to bound here")
    # 512 entries of 1,024 (1,200 shapes fill both): about half, plus slack for the allocator
    assert mine["growth_mb"] < 0.65 * theirs["growth_mb"], (mine, theirs)


def _resident_kb(addr: int, length: int) -> tuple[int, int]:
    """(resident kB, mapped kB) of the mappings overlapping [addr, addr + length)."""
    rss = size = 0
    hit = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            hit = lo < addr + length and addr < hi
            if hit:
                size += (hi - lo) >> 10
        elif hit and line.startswith("Rss:"):
            rss += int(line.split()[1])
    return rss, size


def test_kv_cache_is_resident_from_the_start(checkpoint):
    """The soak's baseline holds the whole KV cache: the CPU cache is written (zeroed) when
    allocated, so a server that cannot hold it fails at start-up, not mid-run, and the pages
    the run writes later are not growth."""
    from halserve import LLM

    llm = LLM(str(checkpoint("llama")), dtype="float32", max_model_len=256, kv_cache_memory=32 << 20)
    kv = llm.engine.runner.kv_cache
    nbytes = kv.numel() * kv.element_size()
    assert nbytes >= 4 << 20
    rss, size = _resident_kb(kv.data_ptr(), nbytes)
    assert size >= nbytes >> 10 and rss >= (nbytes >> 10) - 8, (rss, size, nbytes >> 10)
