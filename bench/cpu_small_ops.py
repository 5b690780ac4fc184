"""cpu_amx's small ops at a batched decode's sizes, per call: rms_norm (with and without its
residual, 32 x 2048 bf16) and silu_and_mul (32 x 5632 out), at the pool's threads and at one.

    python bench/cpu_small_ops.py [--threads 2] [--rows 32] [--hidden 2048] [--inter 5632]

Prints the 10th percentile and the median of 200 calls in us (a shared box's slow calls are
not the op's)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halserve.hal.cpu_amx.backend import CpuAmxBackend  # noqa: E402


def _us(fn, n: int = 200) -> str:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return f"p10 {ts[n // 10] * 1e6:6.1f} us, median {ts[n // 2] * 1e6:6.1f} us"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    a = ap.parse_args()
    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(a.rows, a.hidden, generator=g).bfloat16() for _ in range(2))
    w = torch.randn(a.hidden, generator=g).bfloat16()
    gu = torch.randn(a.rows, 2 * a.inter, generator=g).bfloat16()
    for t in sorted({a.threads, 1}, reverse=True):
        torch.set_num_threads(t)
        b.lib.hs_set_threads(t)
        print(f"{t} thread(s), {a.rows} rows: rms_norm + residual {_us(lambda: b.rms_norm(x, w, 1e-5, residual=r))}; "
              f"rms_norm {_us(lambda: b.rms_norm(x, w, 1e-5))}; silu_and_mul {_us(lambda: b.silu_and_mul(gu))}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
