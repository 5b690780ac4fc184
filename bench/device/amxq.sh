#!/usr/bin/env bash
# Issue 22, session 4 (helper AMXQ): cpu_amx int8 / int4 / bf16 decode GEMVs (M = 1, and M = 4, 16
# on the MLP shape) against the measured multi-threaded read bandwidth, each quantized kernel
# timed before (row-major int4, four-row int8 kernels at every M, prefetch 512) and after (the x16
# int4 layout; int8 on AMX tiles at M = 3..16; prefetch 2048) in the same process, interleaved;
# then the cpu_amx tests. About 100 s on the AMX host.
#   bash bench/device/amxq.sh            (THREADS=16 SET_MB=512 SHAPES=1.1b,8b GEMV_S=65 TEST_S=50;
#                                         SWEEP_OPS=8b:gate_up,8b:down: the prefetch sweep's shapes)
# Writes $OUT/amxq.txt, $OUT/amxq.json, $OUT/amxq_tests.txt.
set -u
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
case ":$PYTHONPATH:" in *":.:"*) ;; *) export PYTHONPATH="$PYTHONPATH:." ;; esac
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=
THREADS=${THREADS:-16}
echo "amxq: $(date -u +%H:%M:%S) threads=$THREADS commit=$(git rev-parse --short HEAD 2>/dev/null)"
nproc; grep -o -w 'amx_int8\|avx512_vnni\|avx512_bf16' /proc/cpuinfo | sort | uniq -c

timeout ${GEMV_S:-65} python - "$OUT" "$THREADS" "${SET_MB:-512}" "${SHAPES:-1.1b,8b}" "${REPS:-3}" <<'EOF' 2>&1 | tee "$OUT/amxq.txt" || echo "amxq: GEMV timing failed or timed out (rc ${PIPESTATUS[0]})"
import dataclasses, json, os, sys, time
import torch

out, threads, set_mb, shapes_arg, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
from halserve.hal.cpu_amx import quant
from halserve.hal.cpu_amx.backend import CpuAmxBackend

b = CpuAmxBackend()
print(b.describe(), flush=True)


def read_bw() -> float:
    a = torch.ones(1 << 28)  # 1 GiB fp32
    a.sum()
    best = min(_t(lambda: a.sum()) for _ in range(5))
    return a.numel() * 4 / best / 1e9


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


SHAPES = {
    "1.1b": {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
             "lm_head": (32000, 2048)},
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
# (label, pack scheme, int4 interleave, hs_set_qkernels (0: four-row VPDPBUSD at every M, 2: the
# default, AMX tiles at M 3..16, 3: also one-row kernels at M <= 2), hs_set_qprefetch bytes
# (512: before this session, 2048: the default now))
VARIANTS = [("bf16", "none", True, 2, 2048), ("int8 before", "int8", True, 0, 512),
            ("int8 after", "int8", True, 2, 2048), ("int8 1row", "int8", True, 3, 2048),
            ("int4 before", "int4", False, 2, 512), ("int4 after", "int4", True, 2, 2048),
            ("w8a8 before", "int8_w8a8", True, 0, 512), ("w8a8 after", "int8_w8a8", True, 2, 2048)]
bw = read_bw()
print(f"read bandwidth {bw:.1f} GB/s (torch sum over 1 GiB, {threads} threads)", flush=True)
# per-core compute: one thread, a 1024 x 2048 weight that stays in L2, best of 40 interleaved rounds
b.lib.hs_set_threads(1)
w0 = torch.randn(1024, 2048, dtype=torch.bfloat16) * 0.05
rm = quant.pack_int4(w0, 128)
i8 = b.pack_weight(w0, "int8")
per = {"int4 before": (rm, 2), "int4 after": (quant.interleave_int4(rm), 2), "int8 before": (i8, 0),
       "int8 after": (i8, 2), "int8 1row": (i8, 3), "bf16": (b.pack_weight(w0, "none"), 2)}
print("\n| per core (1 thread, weight in L2) | M | Gweights/s |")
print("| --- | ---: | ---: |")
for m in (1, 4, 16):
    x = torch.randn(m, 2048, dtype=torch.bfloat16)
    calls = {lab: b.linear_call(x, w) for lab, (w, _) in per.items()}
    best = {lab: 1e9 for lab in per}
    for _ in range(40):
        for lab, (w, qk) in per.items():
            b.lib.hs_set_qkernels(qk)
            calls[lab]()
            best[lab] = min(best[lab], _t(lambda: [calls[lab]() for _ in range(3)]) / 3)
    for lab in per:
        print(f"| {lab} | {m} | {1024 * 2048 * m / best[lab] / 1e9:.1f} |", flush=True)
b.lib.hs_set_qkernels(2)
b.lib.hs_set_threads(threads)
# the large-M (prefill) path dequantizes int4 rows for oneDNN: both layouts, all threads
w0 = torch.randn(11264, 2048, dtype=torch.bfloat16) * 0.05
rm = quant.pack_int4(w0, 128)
dst = torch.empty(11264, 2048, dtype=torch.bfloat16)
for lab, pw in (("int4 before (row-major)", rm), ("int4 after (x16)", quant.interleave_int4(rm))):
    _, kind, wp, sp, g, _, _ = b._plan(pw)
    run = lambda: b.lib.hs_dequant_rows(wp, kind, sp, g, 2048, 0, 11264, dst.data_ptr(), 1)
    run()
    print(f"dequant 11264x2048 -> bf16, {lab}: {min(_t(run) for _ in range(5)) * 1e3:.2f} ms", flush=True)
rows = []
for shape in shapes_arg.split(","):
    for op, (n, k) in SHAPES.get(shape, {}).items():
        w0 = torch.randn(n, k, dtype=torch.bfloat16) * k ** -0.5
        packs, made = {}, {}
        for label, scheme, inter, qk, qpf in VARIANTS:
            key = (scheme, inter)
            if key not in packs:
                # one quantization per bit width: int4's layouts and W8A8's flag share it
                if scheme.startswith("int4"):
                    rm = made.setdefault("int4", quant.pack_int4(w0, 128))
                    one = quant.interleave_int4(rm) if inter else rm
                elif scheme.startswith("int8"):
                    one = made.setdefault("int8", b.pack_weight(w0, "int8"))
                    if scheme == "int8_w8a8":
                        one = dataclasses.replace(one, act_scheme="per_token", extra={})
                else:
                    one = b.pack_weight(w0, scheme)
                nbytes = one.weight.numel() * one.weight.element_size() + (0 if one.scale is None else one.scale.numel() * 4)
                copies = max(2, min(48, -(-set_mb * 2**20 // nbytes)))
                ws = [dataclasses.replace(one, weight=one.weight.clone(), extra=dict(one.extra)) for _ in range(copies)]
                for w in ws:
                    w.extra.pop("cpu_amx_plan", None)
                packs[key] = (ws, nbytes)
        del made
        bw = max(bw, read_bw())  # the roofline: the best read the box gave in this run (others share it)
        ms = (1, 4, 16) if op == "gate_up" else (1,)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            res = {}
            for rnd in range(reps):  # interleaved rounds: before and after see the same box
                for label, scheme, inter, qk, qpf in VARIANTS:
                    ws, nbytes = packs[(scheme, inter)]
                    calls = [b.linear_call(x, w) for w in ws]
                    b.lib.hs_set_qkernels(qk)
                    b.lib.hs_set_qprefetch(qpf)
                    for c in calls[:2]:
                        c()
                    t = _t(lambda: [c() for c in calls]) / len(calls)
                    res[label] = min(res.get(label, 1e9), t)
            b.lib.hs_set_qkernels(2)
            b.lib.hs_set_qprefetch(2048)
            if m > 1:  # the large-M path (dequantized row tiles through oneDNN) at the same M: where to switch
                for scheme in ("int8", "int4"):
                    ws = packs[(scheme, True)][0][:4]
                    plans = [b._plan(w) for w in ws]
                    run = lambda: [quant.linear_tiled(b.lib, x, w, p[1], p[2], p[3], p[4], None) for w, p in zip(ws, plans)]
                    run()
                    res[f"{scheme} tiled"] = min(_t(run) for _ in range(reps)) / len(ws)
            keys = {v[0]: (v[1], v[2]) for v in VARIANTS}
            keys.update({"int8 tiled": ("int8", True), "int4 tiled": ("int4", True)})
            for label in res:
                nbytes = packs[keys[label]][1]
                gbs = nbytes / res[label] / 1e9
                r = dict(shape=shape, op=op, n=n, k=k, m=m, variant=label, us=res[label] * 1e6, bytes=nbytes,
                         gbs=gbs, pct_read=100 * gbs / bw)
                rows.append(r)
                print(f"{shape:5s} {op:8s} {n:6d}x{k:<6d} M={m:<3d} {label:12s} {r['us']:9.1f} us {gbs:7.1f} GB/s "
                      f"{r['pct_read']:5.0f}% of read", flush=True)
        del packs
print(f"read bandwidth, best of the run: {bw:.1f} GB/s", flush=True)
for r in rows:
    r["pct_read"] = 100 * r["gbs"] / bw
# per-shape GEMV totals (one layer's projections; the lm_head apart)
print("\n| shape | variant | GEMV us a layer (M=1) | GB/s | % of read bw | x bf16's GB/s |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for shape in shapes_arg.split(","):
    for label, *_ in VARIANTS:
        sel = [r for r in rows if r["shape"] == shape and r["variant"] == label and r["m"] == 1 and r["op"] != "lm_head"]
        us = sum(r["us"] for r in sel)
        by = sum(r["bytes"] for r in sel)
        if not sel:
            continue
        ref = [r for r in rows if r["shape"] == shape and r["variant"] == "bf16" and r["m"] == 1 and r["op"] != "lm_head"]
        bf_gbs = sum(r["bytes"] for r in ref) / (sum(r["us"] for r in ref) * 1e-6) / 1e9
        gbs = by / (us * 1e-6) / 1e9
        print(f"| {shape} | {label} | {us:.0f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | {gbs / bf_gbs:.2f} |")
json.dump({"read_gbs": bw, "threads": threads, "rows": rows}, open(f"{out}/amxq.json", "w"), indent=1)
# software prefetch distance of the quantized kernels (hs_set_qprefetch; default 2048 bytes), 8B MLP, M = 1
print("\n| prefetch bytes | variant | op | GB/s | % of read |")
print("| ---: | --- | --- | ---: | ---: |")
sweep = os.environ.get("SWEEP_OPS", "8b:gate_up,8b:down" if "8b" in shapes_arg else "")
for op, (n, k) in [(so, SHAPES[so.split(":")[0]][so.split(":")[1]]) for so in sweep.split(",") if so]:
    w0 = torch.randn(n, k, dtype=torch.bfloat16) * k ** -0.5
    x = torch.randn(1, k, dtype=torch.bfloat16)
    for scheme in ("int8", "int4"):
        one = b.pack_weight(w0, scheme)
        nbytes = one.weight.numel() * one.weight.element_size() + one.scale.numel() * 4
        ws = [dataclasses.replace(one, weight=one.weight.clone(), extra=dict(one.extra))
              for _ in range(max(2, set_mb * 2**20 // nbytes))]
        calls = [b.linear_call(x, w) for w in ws]
        best = {}
        for rnd in range(reps):
            for pf in (0, 256, 512, 1024, 2048):
                b.lib.hs_set_qprefetch(pf)
                calls[0]()
                t = _t(lambda: [c() for c in calls]) / len(calls)
                best[pf] = min(best.get(pf, 1e9), t)
        for pf, t in best.items():
            print(f"| {pf} | {scheme} after | {op} {n}x{k} | {nbytes / t / 1e9:.1f} | {100 * nbytes / t / 1e9 / bw:.0f}% |",
                  flush=True)
        del ws, calls
b.lib.hs_set_qprefetch(2048)
EOF

echo "amxq: $(date -u +%H:%M:%S) tests"
# this helper's tests first (fast), then the rest of the cpu_amx files
timeout ${TEST_S:-50} python -m pytest -q tests/hal/test_cpu_amx_quant.py $(ls tests/hal/test_cpu_amx*.py | grep -v _quant) \
    -p no:cacheprovider > "$OUT/amxq_tests.txt" 2>&1
echo "amxq: tests rc=$? ($(tail -1 "$OUT/amxq_tests.txt"))"
echo "amxq: $(date -u +%H:%M:%S) done"
