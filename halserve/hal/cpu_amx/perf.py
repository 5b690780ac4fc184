"""Where a cpu_amx batch-1 decode step spends its time (``python -m halserve.hal.cpu_amx.perf``).

Three measurements, each printed as a ratio to the measured multi-threaded read bandwidth
(torch sum over 1 GiB: a decode reads its weights, it does not copy them):

1. kernel: every linear shape of the model at M = 1, per weight scheme, over enough copies
   of the weight that the set outgrows the L3 (a decode streams from DRAM), timed twice:
   the bare C call (pointers made once) and through ``backend.linear`` (dispatch, Python,
   conversions): the difference is the per-call overhead.
2. step: end-to-end decode tokens/s through the engine (``LLMEngine.step``), one sequence,
   and the weight bytes a token reads / the step time as a share of the read bandwidth.
3. ops: the same steps with every HAL op wrapped in a timer: microseconds per op and per
   layer, and the time outside the ops (model code, scheduler, sampling) per step.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

SHAPE_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096)
OPS = ("linear", "rms_norm", "rotary", "silu_and_mul", "write_kv", "rotary_write_kv", "attention", "sample")


def linear_shapes(s: dict) -> dict[str, tuple[int, int]]:
    h, i, d = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"]
    return {"qkv": ((s["num_attention_heads"] + 2 * s["num_key_value_heads"]) * d, h), "o": (h, h),
            "gate_up": (2 * i, h), "down": (h, i), "lm_head": (s["vocab_size"], h)}


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def kernel_rates(backend, shapes: dict, schemes: list[str], set_bytes: int, prefetch: list[int],
                 reps: int = 3, report=None) -> list[dict]:
    """GB/s of each linear at M = 1: the C call alone and through backend.linear, per
    software prefetch distance. Copies of one packed weight (distinct memory, same values)
    make the set outgrow the caches."""
    import dataclasses

    import torch

    rows = []
    for scheme in schemes:
        for name, (n, k) in shapes.items():
            one = backend.pack_weight(torch.randn(n, k, dtype=torch.bfloat16) * 0.02, scheme)
            nbytes = one.weight.numel() * one.weight.element_size() + (
                one.scale.numel() * 4 if one.scale is not None else 0)
            copies = max(2, min(64, -(-set_bytes // nbytes)))
            ws = [dataclasses.replace(one, weight=one.weight.clone(), extra=dict(one.extra)) for _ in range(copies)]
            for w in ws:
                w.extra.pop("cpu_amx_plan", None)
            x = torch.randn(1, k, dtype=torch.bfloat16)
            calls = [backend.linear_call(x, w) for w in ws]

            def bare():
                for c in calls:
                    c()

            def full():
                for w in ws:
                    backend.linear(x, w)

            for pf in prefetch:
                backend.lib.hs_set_prefetch(pf)
                tb = _best(bare, reps) / copies
                tf = _best(full, reps) / copies
                rows.append({"scheme": scheme, "op": name, "n": n, "k": k, "prefetch": pf, "bytes": nbytes,
                             "copies": copies, "us_c": tb * 1e6, "us_linear": tf * 1e6,
                             "gbs_c": nbytes / tb / 1e9, "gbs_linear": nbytes / tf / 1e9})
                if report:
                    report(rows[-1])
            backend.lib.hs_set_prefetch(512)  # the library's default
            del ws, calls
    return rows


def step_profile(model: Path, backend: str, quant: str, steps: int, prompt: int = 128) -> dict:
    """Decode tokens/s of one sequence, then per-op time with every HAL op wrapped."""
    import torch

    from halserve import LLM, SamplingParams
    from halserve.bench.latency import weight_bytes_per_token

    llm = LLM(str(model), backend=backend, dtype="bfloat16", quantization=None if quant == "none" else quant,
              max_num_seqs=1, max_model_len=prompt + 6 * steps + 32, enable_prefix_caching=False)
    eng, hal = llm.engine, llm.engine.hal
    g = torch.Generator().manual_seed(0)
    eng.add_request("0", torch.randint(3, eng.model_config.vocab_size, (prompt,), generator=g).tolist(),
                    SamplingParams(temperature=0, max_tokens=6 * steps + 8, ignore_eos=True))
    for _ in range(3):
        eng.step()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        ts.append(time.perf_counter() - t)
    ts.sort()
    filed = file_backed_share(eng.model)
    # fewer threads than cores: does anything else (an engine thread, the OS) take a core
    # the pool's barrier then waits for?
    sweep = {}
    full = torch.get_num_threads()
    for n in sorted({max(1, full - 1), max(1, full - 2), max(1, full // 2)} - {full}, reverse=True):
        torch.set_num_threads(n)
        hal.lib.hs_set_threads(n)
        st = []
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            st.append(time.perf_counter() - t)
        sweep[n] = sorted(st)[len(st) // 2] * 1e3
    torch.set_num_threads(full)
    hal.lib.hs_set_threads(full)
    # the few-row ops (silu_and_mul, attention) on the calling thread instead of the pool
    hal.lib.hs_set_small_parallel(0)
    st = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        st.append(time.perf_counter() - t)
    hal.lib.hs_set_small_parallel(1)
    serial_small_ms = sorted(st)[len(st) // 2] * 1e3
    acc: dict = collections.defaultdict(lambda: [0, 0.0, 0])

    def wrap(op):
        f = getattr(hal, op)

        def timed(*a, **kw):
            t = time.perf_counter()
            r = f(*a, **kw)
            dt = time.perf_counter() - t
            key, nb = op, 0
            if op == "linear":
                pw = a[1]
                key = f"linear {pw.out_features}x{pw.in_features}"
                nb = pw.weight.numel() * pw.weight.element_size() + (pw.scale.numel() * 4 if pw.scale is not None
                                                                     else 0)
            e = acc[key]
            e[0] += 1
            e[1] += dt
            e[2] += nb
            return r

        setattr(hal, op, timed)

    for op in OPS:
        wrap(op)
    wt = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        wt.append(time.perf_counter() - t)
    for op in OPS:
        hal.__dict__.pop(op, None)
    anon_ms = None
    if filed > 0.05:
        # the same steps with every weight copied into anonymous memory (the kernel table's
        # kind): does reading from the page cache's file mapping cost bandwidth?
        for pw in packed_weights(eng.model):
            pw.weight = pw.weight.clone()  # a new tensor: the backend remakes its plan
        st = []
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            st.append(time.perf_counter() - t)
        anon_ms = sorted(st)[len(st) // 2] * 1e3
    layers = eng.model_config.num_layers
    ops = {k: {"calls_per_step": n / steps, "us_per_call": dt / n * 1e6, "ms_per_step": dt / steps * 1e3,
               **({"gbs": nb / dt / 1e9} if nb else {})} for k, (n, dt, nb) in acc.items()}
    in_ops = sum(dt for _, dt, _ in acc.values()) / steps
    wbytes = weight_bytes_per_token(eng.model)
    out = {"backend": backend, "quant": quant, "describe": hal.describe(), "weight_bytes": wbytes,
           "step_ms_min": ts[0] * 1e3, "step_ms_median": ts[len(ts) // 2] * 1e3, "tok_s": 1 / ts[len(ts) // 2],
           "step_ms_median_by_threads": {full: ts[len(ts) // 2] * 1e3, **sweep}, "file_backed_share": filed,
           "step_ms_median_small_ops_serial": serial_small_ms,
           "step_ms_median_anonymous_weights": anon_ms,
           "wrapped_step_ms": sum(wt) / steps * 1e3, "ops_ms_per_step": in_ops * 1e3,
           "outside_ops_ms_per_step": (sum(wt) / steps - in_ops) * 1e3,
           "non_linear_us_per_layer": sum(v["ms_per_step"] for k, v in ops.items() if not k.startswith("linear"))
           * 1e3 / layers, "ops": ops}
    del llm, eng, hal
    return out



def hf_step_ms(hf, prompts, steps: int) -> float:
    """HF transformers' greedy decode step with its KV cache after a prefill of ``prompts``
    [rows, len]: median ms of ``steps`` steps after two warm-up steps (the bench's peer)."""
    import statistics

    import torch

    ts = []
    with torch.no_grad():
        o = hf(prompts, use_cache=True)
        cache, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps + 2):
            t = time.perf_counter()
            o = hf(nxt, past_key_values=cache, use_cache=True)
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
            if i >= 2:
                ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def batched_steps(model: Path, backends: list[str], rows: int, dtype: str, steps: int, prompt: int = 128,
                  report=None) -> list[dict]:
    """Decode step time of ``rows`` sequences at once: HF transformers' forward with its KV
    cache first (the peer), then each halserve backend through the engine (same weights,
    same prompts, greedy). Median of ``steps`` steps after two warm-up steps."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 32000, (rows, prompt), generator=g)
    out = []

    def add(row):
        out.append(row)
        if report:
            report(row)

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    ms = hf_step_ms(hf, prompts, steps)
    add({"engine": "HF transformers", "rows": rows, "dtype": dtype, "step_ms": ms, "tok_s": rows / ms * 1e3})
    del hf
    for be in backends:
        from halserve import LLM, SamplingParams

        llm = LLM(str(model), backend=be, dtype=dtype, max_num_seqs=rows, max_model_len=prompt + steps + 16,
                  enable_prefix_caching=False)
        eng = llm.engine
        sp = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(rows):
            eng.add_request(str(i), prompts[i].tolist(), sp)
        started: set = set()
        while len(started) < rows:  # prefill, chunked over steps: until every row has a token
            started |= {o.request_id for o in eng.step() if o.outputs and o.outputs[0].token_ids}
        for _ in range(2):
            eng.step()
        ts = []
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            ts.append(time.perf_counter() - t)
        add({"engine": f"halserve {be}", "rows": rows, "dtype": dtype, "step_ms": statistics.median(ts) * 1e3,
             "tok_s": rows / statistics.median(ts)})
        del llm, eng
    return out


def op_overheads(backend, reps: int = 200, cold: bool = False) -> list[dict]:
    """Microseconds of each small op at batch-1 decode shapes (1.1B Llama: hidden 2048, 32 q /
    4 kv heads of 64, intermediate 5632, vocab 32000), median over ``reps`` calls, four ways:
    through the dispatcher (``backend.<op>``, what the model calls), the op's body without
    dispatch, the bare C call with every pointer made once, and an empty C call (the FFI
    floor); native's op beside them (the peer). ``cold``: a 64 MB sweep before each call, as the GEMV before it leaves the caches."""
    import statistics

    import torch

    from halserve.hal.interface import AttentionMetadata
    from halserve.hal.rope import build_rope_cache
    from halserve.hal.conformance import sampling_tensors

    from halserve.hal.native import NativeBackend

    bf, lib, cls, native = torch.bfloat16, backend.lib, type(backend), NativeBackend()
    sweep = torch.empty(16 << 20)  # 64 MB
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2048, generator=g).to(bf)
    res = torch.randn(1, 2048, generator=g).to(bf)
    w = torch.ones(2048, dtype=bf)
    q = torch.randn(1, 32, 64, generator=g).to(bf)
    k = torch.randn(1, 4, 64, generator=g).to(bf)
    pos = torch.tensor([150])
    cs = build_rope_cache(64, 64, 4096, 10000.0)
    gu = torch.randn(1, 11264, generator=g).to(bf)
    bs, ctx = 16, 160
    cache = torch.randn(2, 64, bs, 4, 64, generator=g).to(bf)
    slots = torch.tensor([ctx - 1])
    meta = AttentionMetadata(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([ctx], dtype=torch.int32),
                             torch.arange(16, dtype=torch.int32)[None], slots, 1, ctx, [1], [ctx], bs, 1)
    logits = torch.randn(1, 32000, generator=g) * 3
    greedy = sampling_tensors(1, 0.0)
    rand = sampling_tensors(1, 0.8, top_k=40, top_p=0.9, seeds=torch.tensor([7]), steps=torch.tensor([3]))
    y, h, o = torch.empty_like(x), torch.empty_like(x), torch.empty(1, 5632, dtype=bf)
    half = cache.stride(0) * cache.element_size()
    cases = {
        "rms_norm+residual 2048": ((x, w, 1e-5, res), (lib.hs_rms_norm, x.data_ptr(), res.data_ptr(), w.data_ptr(),
                                    1, y.data_ptr(), h.data_ptr(), 1, 2048, 1e-5, 1)),
        "rotary 32+4 heads x 64": ((pos, q, k, cs, True), (lib.hs_rotary, pos.data_ptr(), q.data_ptr(), k.data_ptr(),
                                   cs.data_ptr(), 1, 32, 4, 64, 64, 1, 1, cs.shape[0])),
        "silu_and_mul 5632": ((gu,), (lib.hs_silu_and_mul, gu.data_ptr(), o.data_ptr(), 1, 5632, 1)),
        "write_kv 4 heads x 64": ((k, k, cache, slots), (lib.hs_write_kv, k.data_ptr(), k.data_ptr(),
                                  cache.data_ptr(), cache.data_ptr() + half, slots.data_ptr(), 1, 4 * 64 * 2,
                                  64 * bs)),
        # the model's call: the two rows above in one (v aliases k: timing only)
        "rotary_write_kv 32+4 heads x 64": ((pos, q, k, k, cs, True, cache, slots), (
            lib.hs_rotary_write_kv, pos.data_ptr(), q.data_ptr(), k.data_ptr(), k.data_ptr(), cs.data_ptr(),
            cache.data_ptr(), cache.data_ptr() + half, slots.data_ptr(), 1, 32, 4, 64, 64, 1, 1, 0, 0, 0, 0.0,
            cs.shape[0], 64 * bs)),
        f"attention ctx {ctx}": ((q, cache, meta, 0.125), None),
        "sample greedy 32000": ((logits, greedy), None),
        "sample top-k/p 32000": ((logits, rand), None),
    }
    if hasattr(lib, "hs_sample"):
        from halserve.hal.cpu_amx.backend import sample_args

        for name, prm in (("sample greedy 32000", greedy), ("sample top-k/p 32000", rand)):
            dst = torch.empty(1, dtype=torch.int64)
            args, keep = sample_args(logits, prm, dst)
            cases[name] = (cases[name][0], (lib.hs_sample, *args), (keep, dst))  # held: C writes into dst

    def timed(fn) -> float:
        ts = []
        for _ in range(reps):
            if cold:
                sweep.add_(1.0)
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e6

    rows = [{"op": "empty C call (FFI floor)", "us_c": timed(lib.hs_get_threads)}]
    for name, (args, raw, *_) in cases.items():
        op = name.split()[0].split("+")[0]
        row = {"op": name, "us_native": timed(lambda: getattr(native, op)(*args)),
               "us_dispatch": timed(lambda: getattr(backend, op)(*args)),
               "us_body": timed(lambda: getattr(cls, op)._hal_kernel(backend, *args))
               if hasattr(getattr(cls, op), "_hal_kernel") else None}
        if raw is not None:
            row["us_c"] = timed(lambda: raw[0](*raw[1:]))
        rows.append(row)
    return rows


def file_backed_share(model) -> float:
    """The share of the model's linear weight bytes that sit in a file mapping (safetensors
    mmap, 4 KiB pages of the page cache) rather than anonymous memory."""
    try:
        with open("/proc/self/maps") as f:
            maps = []
            for ln in f:
                parts = ln.split()
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                maps.append((lo, hi, len(parts) > 5 and parts[5].startswith("/")))
    except OSError:
        return float("nan")
    total = filed = 0
    for pw in packed_weights(model):
        n, addr = pw.weight.numel() * pw.weight.element_size(), pw.weight.data_ptr()
        total += n
        filed += n if any(lo <= addr < hi and named for lo, hi, named in maps) else 0
    return filed / total if total else float("nan")


def packed_weights(model) -> list:
    from halserve.hal.interface import PackedWeight

    seen, out, stack = set(), [], [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, PackedWeight):
            out.append(obj)
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
    return out


def _omp_libs() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            return sorted({ln.split()[-1] for ln in f if "omp" in ln and ".so" in ln})
    except OSError:
        return []


_GEMV_GAPS = r"""
import json, statistics, sys, time
import torch
from halserve.hal.cpu_amx.backend import CpuAmxBackend
be = CpuAmxBackend()
w = be.pack_weight(torch.randn(2048, 2048).to(torch.bfloat16))  # 8 MB
x = torch.randn(1, 2048).to(torch.bfloat16)
per = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    for _ in range(8):
        be.linear(x, w)
        g = time.perf_counter() + 30e-6  # the Python between two kernels of a decode step
        while time.perf_counter() < g:
            pass
    per.append((time.perf_counter() - t) / 8 * 1e6 - 30)
print(json.dumps(statistics.median(per)))
"""


def gemv_gaps(policies: list[str], rounds: int = 4, reps: int = 50) -> dict[str, list[float]]:
    """us a GEMV (8 MB bf16, M = 1) when eight follow each other 30 us apart, under each
    OpenMP wait policy (``PASSIVE``, ``PASSIVE:2000`` = with GOMP_SPINCOUNT=2000, ``ACTIVE``);
    each policy a fresh process (libgomp reads them once), policies alternating round by round."""
    import json
    import subprocess
    import sys

    out: dict[str, list[float]] = {pol: [] for pol in policies}
    for _ in range(rounds):
        for pol in policies:
            wait, _, spin = pol.partition(":")
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            env["OMP_WAIT_POLICY"] = wait
            if spin:
                env["GOMP_SPINCOUNT"] = spin
            r = subprocess.run([sys.executable, "-c", _GEMV_GAPS, str(reps)], env=env, capture_output=True,
                               text=True, timeout=300)
            out[pol].append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else float("nan"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m halserve.hal.cpu_amx.perf", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quant", default="none,int8,int4", help="comma list: none (bf16), int8, int4, int8_w8a8")
    p.add_argument("--model", default=None, help="bf16 Llama checkpoint (default: a random TinyLlama-shape 1.1B)")
    p.add_argument("--layers", type=int, default=None, help="layers of the random model (default 22)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--set-mb", type=int, default=1024, help="weight bytes per kernel timing (outgrow the L3)")
    p.add_argument("--prefetch", default="512", help="comma list of software prefetch distances (bytes) to time "
                   "(the library's default: 512)")
    p.add_argument("--batched", type=int, default=0, help="also time decode steps of this many sequences: "
                   "--batched-backends through the engine beside HF transformers (0: skip)")
    p.add_argument("--batched-backends", default="native,cpu_amx")
    p.add_argument("--batched-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batched-prompt", type=int, default=128, help="prompt tokens per sequence of the batched run")
    p.add_argument("--ops", action="store_true", help="time each small op at batch-1 shapes (dispatch, body, "
                   "bare C call), warm and after a cache sweep")
    p.add_argument("--gemv-gaps", default=None, help="comma list of OpenMP policies (PASSIVE, PASSIVE:2000 for "
                   "GOMP_SPINCOUNT=2000, ACTIVE): us a GEMV 30 us after the last, each policy in a fresh process")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--no-steps", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    from halserve.bench.cpu import read_bandwidth_gbs
    from halserve.hal.cpu_amx.backend import CpuAmxBackend

    if a.threads:
        torch.set_num_threads(a.threads)
    schemes = [s.strip() for s in a.quant.split(",") if s.strip()]
    shape = dict(SHAPE_1B, **({"num_hidden_layers": a.layers} if a.layers else {}))
    bw = read_bandwidth_gbs()
    be = CpuAmxBackend()
    print(f"{be.describe()}\nthreads {torch.get_num_threads()}  read bandwidth {bw:.1f} GB/s  "
          f"OpenMP runtimes loaded: {_omp_libs()}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}", flush=True)
    res: dict = {"threads": torch.get_num_threads(), "read_gbs": bw, "tier": be.tier, "omp": _omp_libs()}
    if a.gemv_gaps:
        res["gemv_gaps"] = gemv_gaps([x.strip() for x in a.gemv_gaps.split(",") if x.strip()])
        for pol, us in res["gemv_gaps"].items():
            print(f"8 MB bf16 GEMV 30 us after the last, {pol}: " + " / ".join(f"{u:,.0f}" for u in us) + " us")
    if a.ops:
        print("| op | cache | us native | us backend.op | x native | us body (no dispatch) | us C call |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        res["ops"] = {}
        for cold in (False, True):
            rows = op_overheads(be, reps=100 if cold else 200, cold=cold)  # a cold call costs a 64 MB sweep
            res["ops"]["cold" if cold else "warm"] = rows
            for r in rows:
                cells = [f"{r[c]:.1f}" if r.get(c) is not None else "-" for c in ("us_native", "us_dispatch")]
                cells.append(f"{r['us_native'] / r['us_dispatch']:.1f}" if r.get("us_native") else "-")
                cells += [f"{r[c]:.1f}" if r.get(c) is not None else "-" for c in ("us_body", "us_c")]
                print(f"| {r['op']} | {'cold' if cold else 'warm'} | " + " | ".join(cells) + " |", flush=True)
    if not a.no_kernels:
        print("| scheme | linear | N x K | prefetch | us (C) | GB/s (C) | % read bw | us (backend.linear) | GB/s | % |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

        def show(r):
            print(f"| {r['scheme']} | {r['op']} | {r['n']}x{r['k']} | {r['prefetch']} | {r['us_c']:.1f} | "
                  f"{r['gbs_c']:.1f} | "
                  f"{r['gbs_c'] / bw * 100:.0f}% | {r['us_linear']:.1f} | {r['gbs_linear']:.1f} | "
                  f"{r['gbs_linear'] / bw * 100:.0f}% |", flush=True)

        res["kernels"] = kernel_rates(be, linear_shapes(shape), schemes, a.set_mb << 20,
                                      [int(v) for v in a.prefetch.split(",") if v.strip()], report=show)
    if not a.no_steps:
        model = Path(a.model) if a.model else _checkpoint(shape)
        res["steps"] = []
        for q in schemes:
            try:
                r = step_profile(model, "cpu_amx", q, a.steps)
            except Exception as e:  # one scheme failing must not lose the others
                print(f"step {q}: {type(e).__name__}: {e}", flush=True)
                continue
            roof = r["weight_bytes"] / (bw * 1e9)  # seconds a token's weights take to read
            r["pct_read_bw"] = roof / (r["step_ms_median"] / 1e3) * 100
            print(f"\n== {q}: {r['tok_s']:.2f} tok/s (step median {r['step_ms_median']:.1f} ms, min "
                  f"{r['step_ms_min']:.1f}); weights {r['weight_bytes'] / 1e9:.2f} GB -> roofline "
                  f"{1 / roof:.1f} tok/s; at {r['pct_read_bw']:.0f}% of read bandwidth\n"
                  f"   wrapped step {r['wrapped_step_ms']:.1f} ms = ops {r['ops_ms_per_step']:.1f} + outside ops "
                  f"{r['outside_ops_ms_per_step']:.1f}; non-linear ops {r['non_linear_us_per_layer']:.0f} us/layer\n"
                  f"   linear weight bytes in a file mapping (safetensors mmap): {r['file_backed_share']:.0%}"
                  + (f"; step with every weight copied to anonymous memory: "
                     f"{r['step_ms_median_anonymous_weights']:.1f} ms" if r["step_ms_median_anonymous_weights"] else "")
                  + "\n"
                  f"   step with decode attention on one thread (hs_set_small_parallel(0)): "
                  f"{r['step_ms_median_small_ops_serial']:.1f} ms\n"
                  f"   step ms median by threads: "
                  + ", ".join(f"{n}: {v:.1f}" for n, v in r["step_ms_median_by_threads"].items()), flush=True)
            for k, v in sorted(r["ops"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
                gbs = f"  {v['gbs']:.1f} GB/s ({v['gbs'] / bw * 100:.0f}%)" if "gbs" in v else ""
                print(f"   {k:24s} {v['calls_per_step']:5.0f}/step {v['us_per_call']:9.1f} us/call "
                      f"{v['ms_per_step']:8.2f} ms/step{gbs}", flush=True)
            res["steps"].append(r)
    if a.batched:
        model = Path(a.model) if a.model else _checkpoint(shape)
        print(f"\n| engine | {a.batched} sequences {a.batched_dtype} decode step ms ({a.batched_prompt}-token "
              f"prompts) | tok/s | x HF |")
        print("| --- | ---: | ---: | ---: |")
        first: list = []

        def show_row(r):
            first.append(r["step_ms"])
            print(f"| {r['engine']} | {r['step_ms']:.1f} | {r['tok_s']:.1f} | {first[0] / r['step_ms']:.2f} |",
                  flush=True)

        res["batched"] = batched_steps(model, [b.strip() for b in a.batched_backends.split(",") if b.strip()],
                                       a.batched, a.batched_dtype, a.steps, a.batched_prompt, report=show_row)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


def _checkpoint(shape: dict) -> Path:
    from halserve.bench.startup import DEFAULT_CKPT_DIR

    path = DEFAULT_CKPT_DIR.parent / f"cpu-1.1b-L{shape['num_hidden_layers']}-V{shape['vocab_size']}-random-bf16"
    try:
        from halserve.bench.cpu_ckpt import write_random
    except ImportError:
        from halserve.bench.startup import write_random_llama

        if not (path / "config.json").exists():
            write_random_llama(path, shape)
        return path
    return write_random(path, shape)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
