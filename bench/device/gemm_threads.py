"""Prefill-shaped bf16 GEMMs per thread count: oneDNN (torch F.linear) against the AMX tile
kernel (gemm_amx.c, 128 rows a call), TFLOP/s. (Issue 22: on the AMX host the 1.1B bf16 prefill
GEMMs ran at 2.8-3.1 TFLOP/s on 12-16 threads, while two cores of the 2-vCPU AMX box run the same
F.linear at 1.7-2.5 TFLOP/s: does the rate per thread fall as threads are added there, and which
oneDNN kernel runs?)

    python bench/device/gemm_threads.py [--threads 1,2,4,8,12,16] [--m 1024] [--reps 3]

Prints one row per thread count; the oneDNN kernel name of one call (ONEDNN_VERBOSE) comes
from a child process first."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}


def onednn_kernel(m: int) -> str:
    code = ("import torch, torch.nn.functional as F; x = torch.randn(%d, 2048, dtype=torch.bfloat16); "
            "w = torch.randn(2048, 2048, dtype=torch.bfloat16); F.linear(x, w); F.linear(x, w)" % m)
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, ONEDNN_VERBOSE="1"))
    except subprocess.TimeoutExpired:
        return "(ONEDNN_VERBOSE child timed out)"
    hits = re.findall(r"^onednn_verbose,[^\n]*?exec,cpu,[^,]*,([^,]+),", p.stdout, re.M)
    return ", ".join(sorted(set(hits))) or "(no oneDNN exec line: " + (p.stdout + p.stderr)[-200:].replace("\n", " ") + ")"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2,4,8,12,16")
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from halserve.hal.cpu_amx.backend import CpuAmxBackend

    print("oneDNN kernel (bf16 F.linear, M=%d):" % a.m, onednn_kernel(a.m), flush=True)
    b = CpuAmxBackend()
    torch.manual_seed(0)
    ws = {n: torch.randn(s, dtype=torch.bfloat16) * 0.02 for n, s in SHAPES.items()}
    pws = {n: b.pack_weight(w, "none") for n, w in ws.items()}
    xs = {n: torch.randn(a.m, s[1], dtype=torch.bfloat16) for n, s in SHAPES.items()}
    flop = sum(2 * a.m * s[0] * s[1] for s in SHAPES.values())
    print(f"tier={b.tier}; M={a.m}, the four 1.1B projections summed ({flop / 1e9:.1f} GFLOP); "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| threads | oneDNN TFLOP/s | per thread | AMX kernel (128-row calls) TFLOP/s | per thread |")
    print("| ---: | ---: | ---: | ---: | ---: |")

    def onednn():
        for n in SHAPES:
            F.linear(xs[n], ws[n])

    def ours():
        for n in SHAPES:
            x = xs[n]
            for m0 in range(0, a.m, 128):
                b.linear(x[m0:m0 + 128], pws[n])

    for t in [int(v) for v in a.threads.split(",") if v.strip()]:
        torch.set_num_threads(t)
        b.lib.hs_set_threads(t)
        cells = []
        for fn in (onednn, ours):
            fn()
            best = float("inf")
            for _ in range(a.reps):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            tf = flop / best / 1e12
            cells += [f"{tf:.2f}", f"{tf / t:.3f}"]
        print(f"| {t} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
