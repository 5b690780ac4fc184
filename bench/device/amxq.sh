#!/usr/bin/env bash
# Issue 22 (helper AMXQ, sessions 4-5): cpu_amx int8 / int4 / bf16 decode GEMVs (M = 1, and
# M = 4, 16 on the MLP shape) against the measured multi-threaded read bandwidth, each quantized
# kernel timed before and after in the same process, interleaved. Session 5's "after": weights on
# 2 MiB transparent huge pages (quant.on_huge_pages, as pack_weight now places them) and the
# batch-1 kernels claiming chunks of rows (hs_qkernels bit 2 off); "before" = session 4's default
# (4 KiB pages, four-row int8 kernel, static split). Then a whole-step A/B (1.1B int8,
# 4 KiB vs 2 MiB pages, static vs claimed split) and the cpu_amx tests. About 140 s on the AMX host.
#   bash bench/device/amxq.sh            (THREADS=16 SET_MB=512 SHAPES=1.1b,8b GEMV_S=60 STEP_S=60
#                                         TEST_S=30; SWEEP_OPS=8b:gate_up,8b:down: the prefetch sweep)
# Writes $OUT/amxq.txt, $OUT/amxq.json, $OUT/amxq_step.txt, $OUT/amxq_tests.txt.
set -u
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
case ":$PYTHONPATH:" in *":.:"*) ;; *) export PYTHONPATH="$PYTHONPATH:." ;; esac
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=
THREADS=${THREADS:-16}
echo "amxq: $(date -u +%H:%M:%S) threads=$THREADS commit=$(git rev-parse --short HEAD 2>/dev/null)"
nproc; grep -o -w 'amx_int8\|avx512_vnni\|avx512_bf16' /proc/cpuinfo | sort | uniq -c
echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null) defrag $(cat /sys/kernel/mm/transparent_hugepage/defrag 2>/dev/null)"

timeout ${GEMV_S:-60} python3 - "$OUT" "$THREADS" "${SET_MB:-512}" "${SHAPES:-1.1b,8b}" "${REPS:-3}" <<'EOF' 2>&1 | tee "$OUT/amxq.txt" || echo "amxq: GEMV timing failed or timed out (rc ${PIPESTATUS[0]})"
import dataclasses, json, os, sys, time
import torch

out, threads, set_mb, shapes_arg, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
from halserve.hal.cpu_amx import quant
from halserve.hal.cpu_amx.backend import CpuAmxBackend

b = CpuAmxBackend()
QK0 = b.lib.hs_get_qkernels()  # the library's default kernel choice, restored after each A/B
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
# (label, pack scheme, int4 interleave, hs_set_qkernels, hs_set_qprefetch bytes, 2 MiB pages).
# hs_set_qkernels: 0 = linear.c's four-row int8 kernels at every M (no AMX tiles); else one-row
# int8 kernels at M <= 2, bit 1 AMX int8 tiles at M 3..16, bit 2 static split instead of claimed
# chunks. "before" = session 4's default (6: one-row int8, static split; 4 KiB pages); "after" =
# this session's (2: claimed chunks; 2 MiB pages).
VARIANTS = [("bf16", "none", True, 2, 2048, False), ("bf16 2M", "none", True, 2, 2048, True),
            ("int8 before", "int8", True, 6, 2048, False), ("int8 2M", "int8", True, 6, 2048, True),
            ("int8 after", "int8", True, 2, 2048, True), ("int8 4row 2M", "int8", True, 0, 2048, True),
            ("int4 before", "int4", True, 6, 2048, False), ("int4 after", "int4", True, 2, 2048, True)]
# (W8A8 runs the int8 kernels' split and pages: left out to keep eight variants in the time)
bw = read_bw()
print(f"read bandwidth {bw:.1f} GB/s (torch sum over 1 GiB, {threads} threads)", flush=True)
# per-core compute: one thread, a 1024 x 2048 weight that stays in L2, best of 40 interleaved rounds
b.lib.hs_set_threads(1)
w0 = torch.randn(1024, 2048, dtype=torch.bfloat16) * 0.05
rm = quant.pack_int4(w0, 128)
i8 = b.pack_weight(w0, "int8")
per = {"int4 row-major": (rm, 2), "int4 x16": (quant.interleave_int4(rm), 2), "int8 four-row": (i8, 0),
       "int8 one-row": (i8, 2), "bf16": (b.pack_weight(w0, "none"), 2)}
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
b.lib.hs_set_qkernels(QK0)
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
        for label, scheme, inter, qk, qpf, huge in VARIANTS:
            key = (scheme, inter, huge)
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
                ws = [dataclasses.replace(one, weight=quant.on_huge_pages(one.weight.clone()) if huge
                                          else one.weight.clone(), extra=dict(one.extra)) for _ in range(copies)]
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
                for label, scheme, inter, qk, qpf, huge in VARIANTS:
                    ws, nbytes = packs[(scheme, inter, huge)]
                    calls = [b.linear_call(x, w) for w in ws]
                    b.lib.hs_set_qkernels(qk)
                    b.lib.hs_set_qprefetch(qpf)
                    for c in calls[:2]:
                        c()
                    t = _t(lambda: [c() for c in calls]) / len(calls)
                    res[label] = min(res.get(label, 1e9), t)
            b.lib.hs_set_qkernels(QK0)
            b.lib.hs_set_qprefetch(2048)
            if m > 1:  # the large-M path (dequantized row tiles through oneDNN) at the same M: where to switch
                for scheme in ("int8", "int4"):
                    ws = packs[(scheme, True, True)][0][:4]
                    plans = [b._plan(w) for w in ws]
                    run = lambda: [quant.linear_tiled(b.lib, x, w, p[1], p[2], p[3], p[4], None) for w, p in zip(ws, plans)]
                    run()
                    res[f"{scheme} tiled"] = min(_t(run) for _ in range(reps)) / len(ws)
            keys = {v[0]: (v[1], v[2], v[5]) for v in VARIANTS}
            keys.update({"int8 tiled": ("int8", True, True), "int4 tiled": ("int4", True, True)})
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
        ws = [dataclasses.replace(one, weight=quant.on_huge_pages(one.weight.clone()), extra=dict(one.extra))
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

echo "amxq: $(date -u +%H:%M:%S) decode step A/B (1.1B int8, 4 KiB vs 2 MiB pages, kernel modes)"
timeout ${STEP_S:-60} python3 - "$THREADS" <<'EOF' 2>&1 | grep -v "capturing\|Loading" | tee "$OUT/amxq_step.txt" || echo "amxq: step A/B failed or timed out (rc ${PIPESTATUS[0]})"
import os, sys, time
import torch

th = int(sys.argv[1])
torch.set_num_threads(th)
from halserve import LLM, SamplingParams
from halserve.bench.cpu import read_bandwidth_gbs
from halserve.bench.latency import weight_bytes_per_token
from halserve.hal.cpu_amx import quant
from halserve.hal.cpu_amx.perf import SHAPE_1B, _checkpoint

model = _checkpoint(dict(SHAPE_1B))
engines = {}
for huge in (False, True):  # pack_weight places the int8 weights as quant.HUGE_PAGES says at load
    quant.HUGE_PAGES = huge
    eng = LLM(str(model), backend="cpu_amx", dtype="bfloat16", quantization="int8", max_num_seqs=1,
              max_model_len=1024, enable_prefix_caching=False).engine
    g = torch.Generator().manual_seed(0)
    eng.add_request("0", torch.randint(3, 32000, (128,), generator=g).tolist(),
                    SamplingParams(temperature=0, max_tokens=800, ignore_eos=True))
    for _ in range(3):
        eng.step()
    engines[huge] = eng
quant.HUGE_PAGES = True
lib = engines[True].hal.lib
qk0 = lib.hs_get_qkernels()
wb, bw = weight_bytes_per_token(engines[True].model), read_bandwidth_gbs()
print(f"int8 1.1B: {wb / 1e9:.3f} GB a token, read probe {bw:.1f} GB/s, {th} threads", flush=True)
# (2 MiB pages, hs_qkernels): session 4's default (4 KiB, 6: static split), then 2 MiB pages static,
# claimed (2: the default now), and linear.c's four-row kernels (0)
configs = [(False, 6), (True, 6), (True, 2), (True, 0)]
res = {c: [] for c in configs}
for _ in range(5):
    for c in configs:
        lib.hs_set_qkernels(c[1])
        for _ in range(3):
            t = time.perf_counter()
            engines[c[0]].step()
            res[c].append(time.perf_counter() - t)
lib.hs_set_qkernels(qk0)
print("| pages | hs_qkernels | step ms (median) | tok/s | % of read bw | step ms (p20) |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for (huge, qk), v in res.items():
    v.sort()
    med, p20 = v[len(v) // 2], v[len(v) // 5]
    print(f"| {'2 MiB' if huge else '4 KiB'} | {qk} | {med * 1e3:.1f} | {1 / med:.2f} | {wb / med / 1e9 / bw * 100:.0f}% "
          f"| {p20 * 1e3:.1f} |", flush=True)
EOF

echo "amxq: $(date -u +%H:%M:%S) tests"
# this helper's tests first (fast), then the rest of the cpu_amx files
timeout ${TEST_S:-30} python3 -m pytest -q tests/hal/test_cpu_amx_quant.py $(ls tests/hal/test_cpu_amx*.py | grep -v _quant) \
    -p no:cacheprovider > "$OUT/amxq_tests.txt" 2>&1
echo "amxq: tests rc=$? ($(tail -1 "$OUT/amxq_tests.txt"))"
echo "amxq: $(date -u +%H:%M:%S) done"
