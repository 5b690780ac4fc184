"""Skinny bf16 GEMMs of a batched decode (1.1B Llama shapes, M = 1..128 rows) on cpu_amx:
the AMX tile kernel (at several W prefetch distances) beside the C GEMV kernel and torch's
oneDNN F.linear, each streaming its weight from DRAM (copies cycled past the L3).

    python bench/device/amxb_kernels.py [--ms 1,2,4,8,16,32,64,128] [--set-mb 1024] [--json f]

Prints GB/s of weight read and its share of the measured read bandwidth; the choice of
path per M (backend.AMX_MAX_M, the M = 1 GEMV) and the prefetch default come from here."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="1,2,4,8,16,32,64,128")
    p.add_argument("--prefetch", default="512,512:nb,1024:l2,1024:l2:nb,2048:l2:nb,512:r16,1024:l2:r16:nb",
                   help="comma list of W prefetch distances in bytes (':l2': into L2 only; ':nb': also the next "
                   "block's first lines; ':seq' / ':noseq': the whole next block into L2 in address order while this "
                   "one runs, or not (default: with 32-row blocks only); "
                   "':r16': blocks of 16 W rows, else 32 (the default: gemm_amx.c's AMX_FEW_THREADS))")
    p.add_argument("--set-mb", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    p.add_argument("--best", action="store_true", help="the fastest call, not the median (a shared, noisy box)")
    p.add_argument("--huge", action="store_true", help="also time the AMX kernel with each weight copy on 2 MiB "
                   "pages (cpu_amx.quant.on_huge_pages), path names ending ':huge'")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from halserve.bench.cpu import read_bandwidth_gbs
    from halserve.hal.cpu_amx.perf import SHAPE_1B, linear_shapes
    from halserve.hal.cpu_amx.quant import on_huge_pages
    from halserve.hal.cpu_amx.tiers import choose

    tier = choose()
    lib = tier.lib
    bw = read_bandwidth_gbs()
    print(f"tier {tier.name}  threads {torch.get_num_threads()}  read bandwidth {bw:.1f} GB/s", flush=True)
    pfs = [v.strip() for v in a.prefetch.split(",") if v.strip()]
    out = {"threads": torch.get_num_threads(), "read_gbs": bw, "tier": tier.name, "rows": []}
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    print("| linear | N x K | M | path | ms | GB/s | % read bw |\n| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for name, (n, k) in linear_shapes(SHAPE_1B).items():
        if name not in a.shapes.split(","):
            continue
        copies = max(1, (a.set_mb << 20) // (n * k * 2))
        ws = [(torch.rand(n, k, generator=g) - 0.5).to(bf) for _ in range(copies)]
        huge = {id(w): on_huge_pages(w) for w in ws} if a.huge else {}
        for m in [int(v) for v in a.ms.split(",") if v.strip()]:
            x = torch.randn(m, k, generator=g).to(bf)
            y = torch.empty(m, n, dtype=bf)
            paths = {"gemv": lambda w: lib.hs_linear(x.data_ptr(), 1, m, k, w.data_ptr(), 1, 0, 0, n, 0,
                                                     y.data_ptr(), 1, 0, 0),
                     "onednn": lambda w: F.linear(x, w)}
            if tier.name == "amx":
                for pf in pfs + ([f"{v}:huge" for v in pfs] if a.huge else []):
                    fl = int(":l2" in pf) | 2 * int(":nb" in pf) | 4 * int(":seq" in pf) | 16 * int(":noseq" in pf)

                    def amx(w, pf=int(pf.split(":")[0]), fl=fl, rows=16 if ":r16" in pf else 32):
                        lib.hs_set_amx_prefetch(pf, fl)
                        lib.hs_set_amx_rows(rows)
                        return lib.hs_gemm_amx(x.data_ptr(), 1, m, k, w.data_ptr(), n, 0, y.data_ptr(), 1)

                    if ":huge" in pf:
                        amx = (lambda f: lambda w: f(huge[id(w)]))(amx)

                    paths[f"amx pf{pf}"] = amx
            ts: dict = {p_: [] for p_ in paths}
            for _ in range(a.reps):  # interleaved: every path sees the same load
                for p_, f in paths.items():
                    for w in ws:
                        t = time.perf_counter()
                        f(w)
                        ts[p_].append(time.perf_counter() - t)
            for p_, v in ts.items():
                s = min(v) if a.best else statistics.median(v)
                gbs = n * k * 2 / s / 1e9
                out["rows"].append({"linear": name, "n": n, "k": k, "m": m, "path": p_, "ms": s * 1e3, "gbs": gbs})
                print(f"| {name} | {n}x{k} | {m} | {p_} | {s * 1e3:.3f} | {gbs:.1f} | {gbs / bw * 100:.0f}% |",
                      flush=True)
        del ws
    # one layer: the four projections summed, per M and path (lm_head left out)
    layer = {}
    for r in out["rows"]:
        if r["linear"] != "lm_head":
            e = layer.setdefault((r["m"], r["path"]), [0.0, 0])
            e[0] += r["ms"]
            e[1] += r["n"] * r["k"] * 2
    paths = list(dict.fromkeys(p_ for _, p_ in layer))
    print("\n| M | " + " | ".join(f"{p_} ms (GB/s)" for p_ in paths) + " |\n| ---: |" + " ---: |" * len(paths))
    for m in sorted({m for m, _ in layer}):
        print(f"| {m} | " + " | ".join(f"{layer[(m, p_)][0]:.2f} ({layer[(m, p_)][1] / layer[(m, p_)][0] / 1e6:.1f})"
                                      for p_ in paths) + " |", flush=True)
    out["layer"] = [{"m": m, "path": p_, "ms": v[0]} for (m, p_), v in layer.items()]
    if tier.name == "amx":
        lib.hs_set_amx_prefetch(512, 0)
        lib.hs_set_amx_rows(0)  # the default (gemm_amx.c's AMX_FEW_THREADS)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
