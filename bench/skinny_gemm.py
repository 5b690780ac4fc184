"""Decode-shaped GEMMs on the GPU: the weight-streaming kernel (hal/triton/skinny.py) against
cuBLAS bf16, cuBLASLt fp8 (``_scaled_mm``), the tiled fp8 GEMM and the batch-invariant
persistent matmul, on the Llama-8B and 1B projection shapes. Prints GB/s of weight streamed
and % of the device read bandwidth measured in the same run (fp32 sum over 4 GiB).

Every timing is a CUDA graph of calls that rotate over enough copies of the weight to miss
the 50 MB L2 (the 8B qkv and o weights in fp8 would otherwise be served from it).

    python bench/skinny_gemm.py [--json out.json]                 # the tuned configs
    python bench/skinny_gemm.py --sweep --budget 100 --json s.json  # search configs

``--sweep``: stage A times tile configs (KIND gemv/dot, BLOCK_N, BLOCK_K, num_warps,
num_stages, programs per SM -> split count) per (shape, M) with the separate quantize and
reduce kernels; stage B times the best of A with the split reduction fused (FUSED) and the
W8A8 activation quantization in the kernel (QUANT_IN). Then the batch-invariant persistent
matmul at M = 64 and at a prefill size (tile order grouped or not), against cuBLAS. Parts
``fp8_new`` / ``fp8_new_1b``: the tuned table against the ``gemvr`` loop and the tuned
tensor-core form with in-kernel quantization (``fp8_new_space``). Each
candidate's result is checked against torch (NMSE < 1e-4) before it may win; the run stops
exploring when ``--budget`` seconds are spent and writes what it has.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from halserve.hal.quant import quantize
from halserve.hal.triton import configs
from halserve.hal.triton import matmul as mm
from halserve.hal.triton.skinny import skinny_matmul

SHAPES = {"8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
          "1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}}
L2_MISS_BYTES = 256 << 20  # rotate weights over at least this many bytes
DEV = "cuda"  # "cpu" with --smoke: tiny shapes through the Triton interpreter, to check this script


def timed_us(fns, iters=20):
    """Mean us of one call, from a CUDA graph of ``iters`` calls cycling over ``fns``."""
    if DEV == "cpu":
        t = time.perf_counter()
        fns[0]()
        return (time.perf_counter() - t) * 1e6
    for f in fns[:2]:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    g.replay()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / iters * 1e3


def read_bw():
    if DEV == "cpu":
        return 1.0
    x = torch.ones(1 << 30, dtype=torch.float32, device=DEV)  # 4 GiB read by a sum
    t = timed_us([lambda: x.sum()], iters=10)
    del x
    return (4 << 30) / t / 1e3  # GB/s


def nmse(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).sum() / b.pow(2).sum().clamp(min=1e-30))


class Weights:
    """``copies`` bf16 weights of one shape and their fp8 per-channel forms."""

    def __init__(self, n, k, fp8: bool):
        self.n, self.k = n, k
        wb = 1 if fp8 else 2
        copies = max(1, -(-L2_MISS_BYTES // (n * k * wb)))
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        self.bf16 = [w] + [w.roll(i, 0) for i in range(1, copies)] if not fp8 else [w]
        if fp8:
            q, s = quantize(w, "fp8", "per_channel")
            # torch has no roll for fp8: roll the bytes
            self.q = [q] + [q.view(torch.uint8).roll(i, 0).view(q.dtype) for i in range(1, copies)]
            self.s = [s] + [s.roll(i, 0) for i in range(1, copies)]
        self.bytes = n * k * wb


def per_sm_splits(n, k, bn, bk, per_sm):
    want = per_sm * configs.num_sms()
    tiles = -(-n // bn)
    splits = 1
    while tiles * splits < want and k // (splits * 2) >= bk:
        splits *= 2
    return splits


def fp8_tile_space(m):
    """(KIND, BLOCK_N, BLOCK_K, num_warps, num_stages) tried for fp8 W8A8 at m rows."""
    gemv = [(16, 256, 4, 1), (32, 256, 4, 1), (16, 512, 4, 1), (64, 128, 4, 1), (32, 512, 8, 1), (32, 256, 4, 3)]
    dot = [(64, 256, 4, 4), (32, 256, 4, 4), (128, 128, 4, 3), (64, 512, 4, 3)]
    if m > 1:  # the 3D gemv (rows x BLOCK_N x BLOCK_K) ran 2-5x slower than dot in bf16 at 4-16 rows
        gemv = [(8, 256, 4, 1)]
        dot += [(64, 128, 4, 4), (32, 128, 4, 4)]
    return [("gemv",) + c for c in gemv] + [("dot",) + c for c in dot]


def bf16_tile_space(m):
    gemv = [(16, 128, 4, 1), (32, 128, 4, 1), (16, 256, 4, 1), (8, 256, 4, 1), (16, 128, 4, 3)]
    if m >= 16:
        gemv = [(8, 64, 4, 1)]
    dot = [(64, 128, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4)]
    return [("gemv",) + c for c in gemv] + [("dot",) + c for c in dot]


def run_cands(cands, ref, bytes_, bw, deadline, rows, base):
    """Time each (name, cfg, fns, out_fn); returns [(us, name, cfg)] of the correct ones."""
    res = []
    for name, cfg, fns, out_fn in cands:
        if time.perf_counter() > deadline:
            base.setdefault("skipped", []).append(name)
            continue
        rec = dict(base, cand=name, cfg=cfg)
        try:
            err = nmse(out_fn(), ref)
            us = timed_us(fns)
            gbs = bytes_ / us / 1e3
            rec.update(us=round(us, 2), GBs=round(gbs), pct_bw=round(100 * gbs / bw, 1), nmse=err, ok=err < 1e-4)
            if err < 1e-4:
                res.append((us, name, cfg))
        except Exception as e:  # a config that does not compile or launch: recorded, not fatal
            rec["error"] = f"{type(e).__name__}: {e}"[:240]
        rows.append(rec)
    res.sort(key=lambda r: r[0])
    return res


def sweep_fp8(tag, shapes, ms, bw, deadline, rows, best):
    weights = {s: Weights(n, k, fp8=True) for s, (n, k) in shapes.items()}
    for m in ms:  # batch 1 on every shape first: it matters most if the budget runs out
        for sname, (n, k) in shapes.items():
            W = weights[sname]
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            xq, xs = mm.quant_fp8_per_token(x)
            ref = ((xq.float() * xs[:, None]) @ (W.q[0].float() * W.s[0][:, None]).T)
            base = dict(model=tag, shape=sname, N=n, K=k, M=m, dtype="fp8_w8a8")
            t0 = time.perf_counter()
            def scaled(i):  # quantize + cuBLASLt rowwise-scaled fp8 GEMM (the M > 64 path)
                q, qs = mm.quant_fp8_per_token(x)
                return torch._scaled_mm(q, W.q[i].t(), scale_a=qs[:, None].contiguous(),
                                        scale_b=W.s[i][None, :].float().contiguous(), out_dtype=torch.bfloat16)

            peers = [("cublaslt_scaled_mm", None, [lambda i=i: scaled(i) for i in range(len(W.q))], lambda: scaled(0)),
                     ("default", configs.skinny_config(m, n, k, 1),
                      [lambda i=i: skinny_matmul(x, W.q[i], W.s[i], "per_token") for i in range(len(W.q))],
                      lambda: skinny_matmul(x, W.q[0], W.s[0], "per_token"))]
            if m > 4:
                peers.append(("fp8_tiled", None, [lambda i=i: mm.fp8_matmul(xq, xs, W.q[i], W.s[i], x.dtype)
                                                  for i in range(len(W.q))],
                              lambda: mm.fp8_matmul(xq, xs, W.q[0], W.s[0], x.dtype)))
            got = run_cands(peers, ref, W.bytes, bw, deadline, rows, base)
            cands = []
            for kind, bn, bk, nw, ns in fp8_tile_space(m):
                for per_sm in (2, 4, 8):
                    sp = per_sm_splits(n, k, bn, bk, per_sm)
                    cfg = dict(KIND=kind, BLOCK_N=bn, BLOCK_K=bk, SPLITS=sp, FUSED=False, QUANT_IN=False,
                               num_warps=nw, num_stages=ns)
                    if any(c[1] == cfg for c in cands):
                        continue
                    cands.append((f"{kind}_n{bn}_k{bk}_w{nw}_s{ns}_sp{sp}", cfg,
                                  [lambda i=i, c=cfg: skinny_matmul(x, W.q[i], W.s[i], "per_token", cfg=c)
                                   for i in range(len(W.q))],
                                  lambda c=cfg: skinny_matmul(x, W.q[0], W.s[0], "per_token", cfg=c)))
            a = run_cands(cands, ref, W.bytes, bw, deadline, rows, base)
            b = []
            if a:
                cands = []
                for fused, qin, top in [(f, q, t[2]) for t in a[:2] for f in (False, True) for q in (False, True)]:
                    if True:
                        cfg = dict(top, FUSED=fused, QUANT_IN=qin)
                        if (not fused and not qin) or (fused and top["SPLITS"] == 1):
                            continue
                        cands.append((f"B_fused{int(fused)}_qin{int(qin)}_{cfg['KIND']}_n{cfg['BLOCK_N']}"
                                      f"_k{cfg['BLOCK_K']}_sp{cfg['SPLITS']}", cfg,
                                      [lambda i=i, c=cfg: skinny_matmul(x, W.q[i], W.s[i], "per_token", cfg=c)
                                       for i in range(len(W.q))],
                                      lambda c=cfg: skinny_matmul(x, W.q[0], W.s[0], "per_token", cfg=c)))
                b = run_cands(cands, ref, W.bytes, bw, deadline, rows, base)
            win = sorted(a[:1] + b[:1] + got[:3], key=lambda r: r[0])
            summary = dict(base, secs=round(time.perf_counter() - t0, 1),
                           peers={p[1]: round(p[0], 2) for p in got},
                           best=[dict(us=round(u, 2), pct_bw=round(100 * W.bytes / u / 1e3 / bw, 1), name=nm, cfg=c)
                                 for u, nm, c in win[:3]])
            best.append(summary)
            print("[sweep]", json.dumps(summary), flush=True)
    del weights


def fp8_new_space(m, tuned):
    """Session-4 forms: the ``gemvr`` loop (KIND, BLOCK_N, BLOCK_K, num_warps), always with the
    in-kernel quantization, and the tuned tensor-core config with QUANT_IN (its amax pass now
    reads one real row at a time)."""
    out = []
    # 64 weight bytes a thread a step: wider tiles at 4 warps held their fp32 products in
    # 190-230 registers (sm_90 compiles), 1-2 programs an SM
    tiles = [(16, 512, 4), (32, 256, 4), (8, 1024, 4), (32, 512, 8)]
    if m > 1:  # a [rows, BLOCK_N, BLOCK_K] product every step: small tiles
        tiles = [(8, 256, 4), (16, 128, 4)] if m <= 4 else []
    for bn, bk, nw in tiles:
        for per_sm in (2, 4):
            out.append((per_sm, dict(KIND="gemvr", BLOCK_N=bn, BLOCK_K=bk, FUSED=False, QUANT_IN=True, num_warps=nw,
                                     num_stages=1)))
    if tuned.get("KIND") == "dot" and not tuned.get("QUANT_IN"):
        out.append((None, dict(tuned, QUANT_IN=True)))
    # launched as programmatic dependents (the start overlaps the previous kernel's tail; gemvr
    # reads its first weight tile before the wait)
    pdl = [(None, dict(c, PDL=True)) for _, c in out[-1:] if c.get("QUANT_IN") and c["KIND"] == "dot"]
    pdl.append((None, dict(tuned, PDL=True)))
    if m <= 4:
        pdl.append((2, dict(KIND="gemvr", BLOCK_N=16 if m == 1 else 8, BLOCK_K=512 if m == 1 else 256, FUSED=False,
                            QUANT_IN=True, num_warps=4, num_stages=1, PDL=True)))
    return out + pdl


_PDL_OK: list = []


def pdl_ok() -> bool:
    """One small PDL launch, eager and captured in a graph, before any is timed: a capture that
    fails mid-sweep could leave the stream unusable for the candidates after it."""
    if not _PDL_OK:
        try:
            x = torch.randn(1, 1024, device=DEV, dtype=torch.bfloat16)
            q, s = quantize(torch.randn(256, 1024, device=DEV, dtype=torch.bfloat16), "fp8", "per_channel")
            cfg = dict(KIND="gemvr", BLOCK_N=16, BLOCK_K=256, SPLITS=2, FUSED=True, QUANT_IN=True, num_warps=4,
                       num_stages=1, PDL=True)
            want = skinny_matmul(x, q, s, "per_token", cfg=dict(cfg, PDL=False))
            ok = torch.equal(skinny_matmul(x, q, s, "per_token", cfg=cfg), want)
            if DEV == "cuda":
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    y = skinny_matmul(x, q, s, "per_token", cfg=cfg)
                g.replay()
                torch.cuda.synchronize()
                ok = ok and torch.equal(y, want)
            _PDL_OK.append(ok)
        except Exception as e:  # noqa: BLE001 - reported, the sweep goes on without PDL
            print(f"[sweep] PDL probe failed: {type(e).__name__}: {e}"[:300], flush=True)
            _PDL_OK.append(False)
        print(f"[sweep] PDL launches: {'on' if _PDL_OK[0] else 'off'}", flush=True)
    return _PDL_OK[0]


def sweep_fp8_new(tag, shapes, ms, bw, deadline, rows, best):
    """The tuned table (``configs.skinny_config``) against the session-4 forms, each split
    count with the reduction fused and not; cuBLASLt as the peer."""
    use_pdl = pdl_ok()
    weights = {s: Weights(n, k, fp8=True) for s, (n, k) in shapes.items()}
    for m in ms:
        for sname, (n, k) in shapes.items():
            W = weights[sname]
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            xq, xs = mm.quant_fp8_per_token(x)
            ref = ((xq.float() * xs[:, None]) @ (W.q[0].float() * W.s[0][:, None]).T)
            base = dict(model=tag, shape=sname, N=n, K=k, M=m, dtype="fp8_w8a8", part="fp8_new")
            t0 = time.perf_counter()

            def run(c):
                return ([lambda i=i: skinny_matmul(x, W.q[i], W.s[i], "per_token", cfg=c) for i in range(len(W.q))],
                        lambda: skinny_matmul(x, W.q[0], W.s[0], "per_token", cfg=c))

            def scaled(i):
                q, qs = mm.quant_fp8_per_token(x)
                return torch._scaled_mm(q, W.q[i].t(), scale_a=qs[:, None].contiguous(),
                                        scale_b=W.s[i][None, :].float().contiguous(), out_dtype=torch.bfloat16)

            tuned = configs.skinny_config(m, n, k, 1)
            cands = [("cublaslt_scaled_mm", None, [lambda i=i: scaled(i) for i in range(len(W.q))], lambda: scaled(0)),
                     ("tuned", tuned, *run(tuned))]
            seen = [tuned]
            for per_sm, c in fp8_new_space(m, tuned):
                if c.get("PDL") and not use_pdl:
                    continue
                sp = c.get("SPLITS") if per_sm is None else per_sm_splits(n, k, c["BLOCK_N"], c["BLOCK_K"], per_sm)
                for fused in ((False, True) if sp > 1 else (False,)):
                    cfg = dict(c, SPLITS=sp, FUSED=fused)
                    if cfg in seen:
                        continue
                    seen.append(cfg)
                    cands.append((f"{cfg['KIND']}_n{cfg['BLOCK_N']}_k{cfg['BLOCK_K']}_w{cfg['num_warps']}"
                                  f"_s{cfg['num_stages']}_sp{sp}_f{int(fused)}_q{int(cfg['QUANT_IN'])}"
                                  f"{'_pdl' if cfg.get('PDL') else ''}", cfg, *run(cfg)))
            got = run_cands(cands, ref, W.bytes, bw, deadline, rows, base)
            try:  # the same bytes read by one torch reduction: the per-call floor at this size
                floor = round(timed_us([lambda i=i: W.q[i].view(torch.int16).amax() for i in range(len(W.q))]), 2)
            except Exception as e:  # noqa: BLE001 - recorded, the sweep stands without it
                floor = f"{type(e).__name__}"
            summary = dict(base, secs=round(time.perf_counter() - t0, 1), read_once_us=floor,
                           tuned=next((round(u, 2) for u, nm, _ in got if nm == "tuned"), None),
                           cublaslt=next((round(u, 2) for u, nm, _ in got if nm == "cublaslt_scaled_mm"), None),
                           best=[dict(us=round(u, 2), pct_bw=round(100 * W.bytes / u / 1e3 / bw, 1), name=nm, cfg=c)
                                 for u, nm, c in got[:3]])
            best.append(summary)
            print("[sweep]", json.dumps(summary), flush=True)
    del weights


def sweep_bf16(tag, shapes, ms, bw, deadline, rows, best):
    for sname, (n, k) in shapes.items():
        W = Weights(n, k, fp8=False)
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            ref = x.float() @ W.bf16[0].float().T
            base = dict(model=tag, shape=sname, N=n, K=k, M=m, dtype="bf16")
            t0 = time.perf_counter()
            r = range(len(W.bf16))
            cands = [("cublas", None, [lambda i=i: torch.nn.functional.linear(x, W.bf16[i]) for i in r],
                      lambda: torch.nn.functional.linear(x, W.bf16[0])),
                     ("persistent_bi", None, [lambda i=i: mm.persistent_matmul(x, W.bf16[i]) for i in r],
                      lambda: mm.persistent_matmul(x, W.bf16[0]))]
            for kind, bn, bk, nw, ns in bf16_tile_space(m):
                for per_sm in (2, 4):
                    sp = per_sm_splits(n, k, bn, bk, per_sm)
                    for fused in (False, True):
                        cfg = dict(KIND=kind, BLOCK_N=bn, BLOCK_K=bk, SPLITS=sp, FUSED=fused, QUANT_IN=False,
                                   num_warps=nw, num_stages=ns)
                        if any(c[1] == cfg for c in cands) or (fused and sp == 1):
                            continue
                        cands.append((f"{kind}_n{bn}_k{bk}_w{nw}_s{ns}_sp{sp}_f{int(fused)}", cfg,
                                      [lambda i=i, c=cfg: skinny_matmul(x, W.bf16[i], cfg=c) for i in r],
                                      lambda c=cfg: skinny_matmul(x, W.bf16[0], cfg=c)))
            a = run_cands(cands, ref, W.bytes, bw, deadline, rows, base)
            summary = dict(base, secs=round(time.perf_counter() - t0, 1),
                           cublas=next((round(u, 2) for u, nm, _ in a if nm == "cublas"), None),
                           persistent_bi=next((round(u, 2) for u, nm, _ in a if nm == "persistent_bi"), None),
                           best=[dict(us=round(u, 2), pct_bw=round(100 * W.bytes / u / 1e3 / bw, 1), name=nm, cfg=c)
                                 for u, nm, c in a[:3]])
            best.append(summary)
            print("[sweep]", json.dumps(summary), flush=True)
        del W


def sweep_bi(shapes, bw, deadline, rows, best):
    """The batch-invariant GEMM at decode batch 64 and a prefill chunk, against cuBLAS."""
    for sname, (n, k) in shapes.items():
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        for m in (64, 4096):
            if time.perf_counter() > deadline:
                return
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            ref = x.float() @ w.float().T
            base = dict(model="8b", shape=sname, N=n, K=k, M=m, dtype="bf16_bi")
            cfg0 = configs.matmul_fixed_config(n, k)
            sp0 = mm.fixed_splits(n, k, cfg0["BLOCK_N"], cfg0["BLOCK_K"])
            cands = [("cublas", None, [lambda: torch.nn.functional.linear(x, w)], lambda: torch.nn.functional.linear(x, w)),
                     ("persistent_grouped", None, [lambda: mm.persistent_matmul(x, w)], lambda: mm.persistent_matmul(x, w))]
            # which tile changes keep a row's bits (same BLOCK_K and split count): "bitwise" below
            for name, over in (("persistent_ungrouped", dict(GROUP_M=1)), ("bn128_split1", dict(BLOCK_N=128, SPLITS=1)),
                               ("bm128_bn128_w8", dict(BLOCK_M=128, BLOCK_N=128, SPLITS=1, num_warps=8, num_stages=3)),
                               ("bm128_w8_same_n_split", dict(BLOCK_M=128, SPLITS=sp0, num_warps=8, num_stages=3)),
                               ("bm128_bn128_w8_same_split", dict(BLOCK_M=128, BLOCK_N=128, SPLITS=sp0, num_warps=8,
                                                                  num_stages=3)),
                               ("bn128_same_split", dict(BLOCK_N=128, SPLITS=sp0)),
                               ("progs1", dict(PROGS_PER_SM=1))):
                c = dict(cfg0, **over)
                cands.append((name, c, [lambda c=c: mm.persistent_matmul(x, w, cfg=c)], lambda c=c: mm.persistent_matmul(x, w, cfg=c)))
            a = run_cands(cands, ref, 2 * n * k, bw, deadline, rows, base)
            y0 = mm.persistent_matmul(x, w)
            bitwise = {}
            for name, c, _, out_fn in cands[2:]:
                try:
                    bitwise[name] = bool(torch.equal(out_fn(), y0))
                except Exception as e:  # noqa: BLE001 - recorded
                    bitwise[name] = f"{type(e).__name__}"
            flops = 2 * m * n * k
            summary = dict(base, cfg=cfg0, splits=sp0, times_us={nm: round(u, 1) for u, nm, _ in a},
                           tflops={nm: round(flops / u / 1e6, 1) for u, nm, _ in a}, bitwise=bitwise)
            best.append(summary)
            print("[sweep]", json.dumps(summary), flush=True)


def _warm_worker(tasks, dev="cuda"):
    """Compile (into Triton's disk cache) the kernels of ``tasks`` on small tensors with the
    same specializations (M, SPLITS == 1, multiples of 16) as the sweep's shapes."""
    done = 0
    for task in tasks:
        wbytes, m, cfg = task[:3]
        k = task[3] if len(task) > 3 else 2048  # in-kernel quantization compiles per K (its amax step)
        try:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(512, k, device=dev, dtype=torch.bfloat16)
            if wbytes == 1:
                q, s = quantize(w, "fp8", "per_channel")
                skinny_matmul(x, q, s, "per_token", cfg=cfg)
            else:
                skinny_matmul(x, w, cfg=cfg)
            done += 1
        except Exception:  # the sweep records the error itself
            pass
    return done


def warm(parts, procs):
    """Compile the sweep's stage-A kernels in ``procs`` processes first (compiling dominates
    a serial sweep; the host has 16 cores)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    tasks = []
    for part in parts:
        if part.startswith("fp8_new"):
            seen = set()
            for m in ((1,) if part.endswith("_1b") else (1, 4, 16)):
                for n, k in SHAPES["1b" if part.endswith("_1b") else "8b"].values():
                    for _, c in fp8_new_space(m, configs.skinny_config(m, n, k, 1)):
                        for sp, fused in ((1, False), (2, False), (2, True)):
                            cfg = dict(c, SPLITS=sp, FUSED=fused)
                            key = (m, min(1 << (k - 1).bit_length(), 4096), json.dumps(cfg, sort_keys=True))
                            if key not in seen:
                                seen.add(key)
                                tasks.append((1, m, cfg, k))
            continue
        space = fp8_tile_space if part.startswith("fp8") else bf16_tile_space if part.startswith("bf16") else None
        if space is None:
            continue
        wb = 1 if part.startswith("fp8") else 2
        for m in ((1,) if part.endswith("_1b") else (1, 4, 16)):
            for kind, bn, bk, nw, ns in space(m):
                # stage B's forms too (fused reduction, in-kernel quantization): one compile each
                for sp, fused, qin in ((1, False, False), (2, False, False), (2, True, False), (1, False, True),
                                       (2, False, True), (2, True, True)):
                    if qin and wb == 2:
                        continue
                    tasks.append((wb, m, dict(KIND=kind, BLOCK_N=bn, BLOCK_K=bk, SPLITS=sp, FUSED=fused, QUANT_IN=qin,
                                              num_warps=nw, num_stages=ns)))
    t = time.perf_counter()
    chunks = [tasks[i::procs] for i in range(procs)]
    with cf.ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as ex:
        done = sum(ex.map(_warm_worker, chunks, [DEV] * procs))
    print(f"[sweep] warmed {done}/{len(tasks)} kernels in {procs} processes, {time.perf_counter() - t:.0f}s", flush=True)


def tuned(bw):
    rows = []
    for tag, shapes in SHAPES.items():
        for sname, (n, k) in shapes.items():
            W = Weights(n, k, fp8=True)
            Wb = Weights(n, k, fp8=False)
            for m in (1, 4, 16, 64):
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                rb, rq = range(len(Wb.bf16)), range(len(W.q))
                line = {"model": tag, "shape": sname, "N": n, "K": k, "M": m}
                cands = {"cublas_bf16": ([lambda i=i: torch.nn.functional.linear(x, Wb.bf16[i]) for i in rb], Wb.bytes),
                         "persistent_bf16(bi)": ([lambda i=i: mm.persistent_matmul(x, Wb.bf16[i]) for i in rb], Wb.bytes),
                         "skinny_fp8_w8a8": ([lambda i=i: skinny_matmul(x, W.q[i], W.s[i], "per_token") for i in rq],
                                             W.bytes)}
                for name, (fns, nbytes) in cands.items():
                    try:
                        us = timed_us(fns)
                        gbs = nbytes / us / 1e3
                        line[name] = {"us": round(us, 2), "GB/s": round(gbs), "pct_bw": round(100 * gbs / bw, 1)}
                    except Exception as e:  # one failing candidate must not hide the rest
                        line[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
                rows.append(line)
                print(json.dumps(line), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds the sweep may explore")
    ap.add_argument("--parts", default="fp8,bf16,bi,bf16_1b", help="sweep parts, in order")
    ap.add_argument("--warm", type=int, default=0, help="compile stage A first in this many processes")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--emit-table", help="write the fp8_new parts' fastest skinny config per shape here, in the "
                    "format configs reads from $HALSERVE_SKINNY_CONFIGS (an end-to-end run on what this sweep found)")
    args = ap.parse_args()
    if args.smoke:
        global DEV, L2_MISS_BYTES
        DEV, L2_MISS_BYTES = "cpu", 1
        for shapes in SHAPES.values():
            for key, (n, k) in shapes.items():
                shapes[key] = (n // 128, k // 128)
    if args.sweep and args.warm:
        warm(args.parts.split(","), args.warm)
    bw = read_bw()
    card = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)"
    print(f"device {card} read bandwidth {bw:.0f} GB/s (fp32 sum over 4 GiB)", flush=True)
    out = {"card": card, "read_bw_GBs": bw, "date": time.strftime("%Y-%m-%d %H:%M")}
    if not args.sweep:
        out["rows"] = tuned(bw)
    else:
        rows, best = [], []
        out.update(rows=rows, best=best)
        start = time.perf_counter()
        parts = args.parts.split(",")
        # each part gets its share of what is left, so a slow part cannot starve the rest
        share = {"fp8": 5, "bf16": 3, "bi": 3, "bf16_1b": 1, "fp8_1b": 1, "fp8_new": 4, "fp8_new_1b": 1}
        for i, part in enumerate(parts):
            left = args.budget - (time.perf_counter() - start)
            mine = left * share.get(part, 1) / sum(share.get(p, 1) for p in parts[i:])
            deadline = time.perf_counter() + mine
            print(f"[sweep] part {part}: {mine:.0f}s", flush=True)
            try:
                if part == "fp8":
                    sweep_fp8("8b", SHAPES["8b"], (1, 4, 16), bw, deadline, rows, best)
                elif part == "bf16":
                    sweep_bf16("8b", SHAPES["8b"], (1, 4, 16), bw, deadline, rows, best)
                elif part == "bi":
                    sweep_bi(SHAPES["8b"], bw, deadline, rows, best)
                elif part == "bf16_1b":
                    sweep_bf16("1b", SHAPES["1b"], (1,), bw, deadline, rows, best)
                elif part == "fp8_1b":
                    sweep_fp8("1b", SHAPES["1b"], (1,), bw, deadline, rows, best)
                elif part == "fp8_new":
                    sweep_fp8_new("8b", SHAPES["8b"], (1, 4, 16), bw, deadline, rows, best)
                elif part == "fp8_new_1b":
                    sweep_fp8_new("1b", SHAPES["1b"], (1,), bw, deadline, rows, best)
            except Exception as e:  # keep the other parts
                print(f"[sweep] part {part} failed: {type(e).__name__}: {e}", flush=True)
            if args.json:  # what we have so far survives a timeout
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.emit_table and args.sweep:
        entries = []
        for b in out["best"]:
            win = next((x for x in b.get("best", []) if x.get("cfg")), None) if b.get("part") == "fp8_new" else None
            if win is not None:
                entries.append(dict(weights="fp8", rows=b["M"], N=b["N"], K=b["K"], cfg=win["cfg"], us=win["us"],
                                    name=win["name"], tuned_us=b.get("tuned")))
        with open(args.emit_table, "w") as f:
            json.dump({"arch": configs.arch(), "card": card, "date": out["date"], "entries": entries}, f, indent=1)
        print(f"[sweep] wrote {len(entries)} configs to {args.emit_table}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
