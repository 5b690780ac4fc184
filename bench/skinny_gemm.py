"""Decode-shaped GEMMs on the GPU: the split-K weight-streaming kernel (hal/triton/skinny.py)
against cuBLAS bf16, the fp8 kernels it would replace and the batch-invariant persistent matmul,
on the Llama-8B and 1B projection shapes. Prints GB/s of weight streamed and % of the measured
device read bandwidth, checks results against torch and batch invariance (row 0 alone vs in a batch).

    python bench/skinny_gemm.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from halserve.hal.triton import matmul as mm
from halserve.hal.triton.skinny import skinny_matmul

from halserve.hal.quant import quantize

SHAPES = {"8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
          "1b": [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]}


def bench(fn, iters=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    g.replay()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / iters * 1e3  # us


def read_bw():
    x = torch.ones(1 << 30, dtype=torch.float32, device="cuda")  # 4 GiB read by a sum
    t = bench(lambda: x.sum(), iters=10)
    return (4 << 30) / t / 1e3  # GB/s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    bw = read_bw()
    print(f"device {torch.cuda.get_device_name()} read bandwidth {bw:.0f} GB/s (fp32 sum over 4 GiB)", flush=True)
    rows = []
    for tag, shapes in SHAPES.items():
        for n, k in shapes:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            q, s = quantize(w, "fp8", "per_channel")
            for m in (1, 4, 16, 64):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                cands = {
                    "cublas_bf16": (lambda: torch.nn.functional.linear(x, w), 2),
                    "skinny_bf16": (lambda: skinny_matmul(x, w), 2),
                    "persistent_bf16(bi)": (lambda: mm.persistent_matmul(x, w), 2),
                    "skinny_fp8_w8a8": (lambda: skinny_matmul(x, q, s, "per_token"), 1),
                    "fp8_tiled(M>16 path)": (lambda: mm.fp8_matmul(*mm.quant_fp8_per_token(x), q, s, x.dtype), 1),
                }
                if m <= 16:
                    cands["fused_quant_fp8(old)"] = (lambda: mm.fp8_matmul_fused_quant(x, True, q, s), 1)
                ref = (x.float() @ w.float().T)
                err = (skinny_matmul(x, w).float() - ref).pow(2).sum() / ref.pow(2).sum()
                inv = torch.equal(skinny_matmul(x[:1], w)[0], skinny_matmul(x, w)[0])
                line = {"model": tag, "N": n, "K": k, "M": m, "nmse_bf16": float(err), "invariant": inv}
                for name, (fn, wb) in cands.items():
                    try:
                        us = bench(fn)
                        gbs = n * k * wb / us / 1e3
                        line[name] = {"us": round(us, 2), "GB/s": round(gbs), "pct_bw": round(100 * gbs / bw, 1)}
                    except Exception as e:  # one failing candidate must not hide the rest
                        line[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
                rows.append(line)
                print(json.dumps(line), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"read_bw_GBs": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
