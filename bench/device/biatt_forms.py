"""Batch-invariant GEMM prefill forms on the 8B shapes at M = 4096: TFLOP/s of each candidate
tile form beside cuBLAS and the form in use, and whether every sampled row keeps the bits the
row gets alone (M = 1, the decode form). A form is only a candidate for configs.BI_LARGE_M if
"bitwise" is true on every shape. One JSON line per (shape, form).
    python3 bench/device/biatt_forms.py [--budget SECONDS] [--json PATH]"""
from __future__ import annotations

import argparse
import json
import time

import torch

# o and down have split-K 2 on the H200 (their column tiles alone leave SMs idle at M = 1)
SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336), "gate_up": (28672, 4096)}
FORMS = {  # overrides of the decode form; BLOCK_K and the split count are what a row's sums follow
    "in_use": None,
    "bm128_bn128_k128_w8_s3_partials": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "bm128_bn128_k64_w8_s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, SPLITS_INLINE=True),
    "bm128_bn256_k64_w8_s3": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, SPLITS_INLINE=True),
    "bm256_bn128_k64_w8_s3": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, SPLITS_INLINE=True),
}
ROWS = (0, 1, 127, 128, 2049, 4095)


def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / reps  # us


def main() -> int:
    from halserve.hal.triton import configs
    from halserve.hal.triton import matmul as mm

    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=25.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    deadline = time.perf_counter() + args.budget
    out = []
    m = 4096
    for name, (n, k) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        alone = torch.cat([mm.persistent_matmul(x[i:i + 1].contiguous(), w) for i in ROWS])
        flops = 2 * m * n * k
        t = timed(lambda: torch.nn.functional.linear(x, w))
        out.append(dict(shape=name, form="cublas", us=round(t, 1), tflops=round(flops / t / 1e6, 1)))
        print("[forms]", json.dumps(out[-1]), flush=True)
        base = configs.matmul_fixed_config(n, k)
        for form, over in FORMS.items():
            if time.perf_counter() > deadline:
                print(f"[forms] budget spent before {name}/{form}", flush=True)
                break
            cfg = None if over is None else dict(base, **over)
            row = dict(shape=name, form=form, cfg=cfg or configs.matmul_fixed_config(n, k, m))
            try:
                y = mm.persistent_matmul(x, w, cfg=cfg)
                row["bitwise"] = bool(torch.equal(y[list(ROWS)], alone))
                t = timed(lambda: mm.persistent_matmul(x, w, cfg=cfg))
                row.update(us=round(t, 1), tflops=round(flops / t / 1e6, 1))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: recorded
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            out.append(row)
            print("[forms]", json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
