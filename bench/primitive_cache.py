"""What bounding oneDNN's GEMM primitive caches costs: the same serving-like workload on the
CPU with the caches at a given capacity, in fresh processes, alternated, RSS and wall time.

The CPU backends run GEMMs through torch's oneDNN, which JIT-builds one primitive per
(M, N, K) and keeps it in two LRU caches (oneDNN's ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` and
ideep's ``LRU_CACHE_CAPACITY`` in front of it, 1,024 each by default). halserve bounds both
(halserve/__init__.py); this measures what that costs in speed and saves in memory.

    PYTHONPATH=. python bench/primitive_cache.py [--model halserve/demo_model] [--caps 1024,256]

Workload per process: prefill of 64 prompts of distinct lengths (one at a time: a distinct M
each), then batched decode of 64 sequences whose lengths differ (the batch shrinks from 64
to 1: every batch size once), repeated twice so the second pass shows what the cache keeps.
Wall times on a shared machine are noisy (CPU seconds of the process, threads sleeping
when idle under OMP_WAIT_POLICY=PASSIVE, much less so); the cost the capacity can add is JIT builds, so
oneDNN's own log (``ONEDNN_VERBOSE=profile_create``) counts them and sums their time: builds
x their time against the workload's wall time is the ratio to read.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

CHILD = r"""
import json, re, resource, sys, time
import torch
import halserve
from halserve import LLM, SamplingParams
from halserve import hostmem

def rss():
    return int(re.search(r"VmRSS:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

llm = LLM(sys.argv[1], max_model_len=1024, max_num_seqs=64, kv_cache_memory=64 << 20)
llm.generate([{"prompt_token_ids": [5] * 16}], SamplingParams(max_tokens=2))
hostmem.trim(); base = rss()
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

out = {}
for rep in range(2):
    t, c = time.perf_counter(), cpu()
    for n in range(9, 9 + 64):
        llm.generate([{"prompt_token_ids": [(i * 7 + n) % 200 + 3 for i in range(2 * n)]}],
                     SamplingParams(max_tokens=1))
    out[f"prefill_s_{rep}"], out[f"prefill_cpu_s_{rep}"] = time.perf_counter() - t, cpu() - c
    t, c = time.perf_counter(), cpu()
    llm.generate([{"prompt_token_ids": [(i * 13 + k) % 200 + 3 for i in range(16)]} for k in range(64)],
                 [SamplingParams(max_tokens=k + 1, ignore_eos=True) for k in range(64)])
    out[f"decode_s_{rep}"], out[f"decode_cpu_s_{rep}"] = time.perf_counter() - t, cpu() - c
hostmem.trim()
out["rss_growth_mb"] = rss() - base
print("RESULT " + json.dumps(out))
"""


def run_one(model: str, cap: int | None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd(), PYTHONUNBUFFERED="1", ONEDNN_VERBOSE="profile_create")
    for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        env.pop(k, None)
        if cap is not None:
            env[k] = str(cap)
    p = subprocess.run([sys.executable, "-c", CHILD, model], env=env, capture_output=True, text=True, timeout=900)
    m = re.search(r"^RESULT (.*)$", p.stdout, re.M)
    if not m:
        raise RuntimeError(f"child failed ({p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(m.group(1))
    builds = [float(x) for x in re.findall(r"^onednn_verbose,.*create:cache_miss,.*,([0-9.]+)$", p.stdout, re.M)]
    out["jit_builds"] = len(builds)
    out["jit_build_s"] = round(sum(builds) / 1e3, 3)
    out["wall_s"] = round(sum(v for k, v in out.items() if re.match(r"(prefill|decode)_s_", k)), 3)
    out["cpu_s"] = round(sum(v for k, v in out.items() if "_cpu_s_" in k), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="halserve/demo_model")
    ap.add_argument("--caps", default="1024,default", help="comma list: a capacity, or 'default' (halserve's)")
    ap.add_argument("--rounds", type=int, default=1, help="alternated rounds per capacity")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    caps = [None if c == "default" else int(c) for c in a.caps.split(",")]
    res: dict[str, list] = {str(c): [] for c in caps}
    for r in range(a.rounds):
        for c in caps:
            t = time.perf_counter()
            res[str(c)].append(run_one(a.model, c))
            print(f"round {r} cap {c or 'halserve default'}: {res[str(c)][-1]} ({time.perf_counter() - t:.0f} s)",
                  flush=True)
    summary = {}
    for c, rows in res.items():
        summary[c] = {k: round(min(row[k] for row in rows), 3) for k in rows[0]}  # best of rounds: least noise
    ref = summary[str(caps[0])]
    for c, s in summary.items():
        ratios = {k: round(s[k] / ref[k], 3) for k in s if k.endswith("_s") or "_s_" in k}
        print(f"cap {c if c != 'None' else 'halserve default'}: {s}\n  JIT build time / wall time "
              f"{s['jit_build_s'] / s['wall_s']:.2%}; ratio to cap {caps[0]}: {ratios}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "runs": res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
