"""The batch-1 GEMVs of the 1.1B shape per thread count: does the int4 kernel stop scaling where
int8 and bf16 go on? (Issue 22: on the AMX host the 1.1B int4 decode ran at 19 GB/s on 16
threads in sessions 4 and 7, slower than bf16 on a third of the bytes, while one core of the
2-vCPU box streams ~10 GB/s of int4 and the 12-thread 8B int4 step read 70 GB/s.)

    python bench/device/q_threads.py [--threads 1,2,4,8,12,16] [--set-mb 512] [--reps 5] [--names qkv,o,...]

For each thread count and scheme (bf16, int8, int4): every 1.1B projection at M = 1, the C call
``linear`` makes, alone (backend.linear_call: bf16 on the AMX tier is the tile kernel since session 11,
the C GEMV elsewhere) over enough copies of the packed weight that the set outgrows the
L2s, best of ``reps``; GB/s of weight bytes, beside a torch-sum read probe at the same thread
count. A scaling cliff at one count (int4 only) points at the kernel's thread split or at cores
shared by two threads; a flat int4 line at every count points at its per-core rate."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2,4,8,12,16")
    p.add_argument("--schemes", default="none,int8,int4")
    p.add_argument("--set-mb", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--names", default="qkv,o,gate_up,down", help="projections of the 1.1B shape (also lm_head)")
    a = p.parse_args(argv)
    import torch

    from halserve.bench.cpu import read_bandwidth_gbs
    from halserve.hal.cpu_amx.backend import CpuAmxBackend
    from halserve.hal.cpu_amx.perf import SHAPE_1B, linear_shapes

    b = CpuAmxBackend()
    all_shapes = linear_shapes(SHAPE_1B)
    shapes = {k: all_shapes[k] for k in a.names.split(",")}
    sets = {}
    for scheme in a.schemes.split(","):
        for name, (n, k) in shapes.items():
            one = b.pack_weight(torch.randn(n, k, dtype=torch.bfloat16) * 0.02, scheme)
            nbytes = one.weight.numel() * one.weight.element_size() + (
                one.scale.numel() * 4 if one.scale is not None else 0)
            copies = max(2, min(64, -(-(a.set_mb << 20) // nbytes)))
            ws = [dataclasses.replace(one, weight=one.weight.clone(), extra=dict(one.extra)) for _ in range(copies)]
            x = torch.randn(1, k, dtype=torch.bfloat16)
            sets[(scheme, name)] = (nbytes, [b.linear_call(x, w) for w in ws])
    print(f"{b.describe().split(' accelerated')[0]} tier={b.tier}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| threads | read GB/s | " + " | ".join(f"{s} {n}" for s, n in sets) + " |")
    print("| ---: | ---: |" + " ---: |" * len(sets))
    for t in [int(v) for v in a.threads.split(",") if v.strip()]:
        torch.set_num_threads(t)
        b.lib.hs_set_threads(t)
        probe = read_bandwidth_gbs()
        cells = []
        for nbytes, calls in sets.values():
            best = float("inf")
            for _ in range(a.reps + 1):
                t0 = time.perf_counter()
                for c in calls:
                    c()
                best = min(best, (time.perf_counter() - t0) / len(calls))
            cells.append(f"{nbytes / best / 1e9:.1f}")
        print(f"| {t} | {probe:.1f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
