"""Batched decode step of cpu_amx with and without the AMX tile GEMM, beside HF transformers.

    python bench/device/amxb_step.py --rows 16,64 --prompt 32 --steps 8 [--layers 22] [--json f]

One process, same random TinyLlama-shape weights (bf16) and prompts: HF's forward with its KV
cache (the peer), then the halserve engine with ``rows`` sequences whose steps alternate
between the AMX GEMM on and off (the pre-AMX paths: C GEMV for M <= 8, oneDNN above), so
both see the same box load. Then a few steps of each with every HAL op timed: where a step
goes. Each step time is also put against the weight read floor (weight bytes / measured
read bandwidth)."""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# steps run eagerly: a captured step (graph.py) would replay whichever path ran at capture,
# and the on/off interleave below must switch paths step by step
os.environ.setdefault("HALSERVE_CPU_GRAPHS", "0")

OPS = ("linear", "rms_norm", "rotary", "silu_and_mul", "write_kv", "attention", "sample")


def hf_step_ms(model: Path, prompts, steps: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from halserve.hal.cpu_amx.perf import hf_step_ms as step_ms

    return step_ms(AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval(), prompts, steps)


def op_profile(eng, hal, steps: int) -> dict:
    acc: dict = collections.defaultdict(lambda: [0, 0.0])

    def wrap(op):
        f = getattr(hal, op)

        def timed(*a, **kw):
            t = time.perf_counter()
            r = f(*a, **kw)
            key = f"linear {a[1].out_features}x{a[1].in_features}" if op == "linear" else op
            acc[key][0] += 1
            acc[key][1] += time.perf_counter() - t
            return r

        setattr(hal, op, timed)

    for op in OPS:
        wrap(op)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    total = (time.perf_counter() - t0) / steps
    for op in OPS:
        hal.__dict__.pop(op, None)
    ops = {k: dt / steps * 1e3 for k, (n, dt) in sorted(acc.items(), key=lambda kv: -kv[1][1])}
    return {"step_ms": total * 1e3, "ops_ms": ops, "outside_ops_ms": total * 1e3 - sum(ops.values())}


def halserve_steps(model: Path, prompts, steps: int, profile_steps: int) -> dict:
    from halserve import LLM, SamplingParams

    rows, plen = prompts.shape
    llm = LLM(str(model), backend="cpu_amx", dtype="bfloat16", max_num_seqs=rows,
              max_model_len=plen + 2 * steps + 2 * profile_steps + 16, enable_prefix_caching=False)
    eng = llm.engine
    hal = eng.hal
    sp = SamplingParams(temperature=0, max_tokens=2 * steps + 2 * profile_steps + 8, ignore_eos=True)
    for i in range(rows):
        eng.add_request(str(i), prompts[i].tolist(), sp)
    started: set = set()
    while len(started) < rows:
        started |= {o.request_id for o in eng.step() if o.outputs and o.outputs[0].token_ids}
    for on in (True, False):
        hal.amx_gemm = on
        eng.step()
    ts = {True: [], False: []}
    for _ in range(steps):
        for on in (True, False):
            hal.amx_gemm = on
            t = time.perf_counter()
            eng.step()
            ts[on].append(time.perf_counter() - t)
    prof = {}
    for on in (True, False):
        hal.amx_gemm = on
        prof["amx" if on else "pre_amx"] = op_profile(eng, hal, profile_steps)
    hal.amx_gemm = True
    return {"describe": hal.describe(), "amx_step_ms": statistics.median(ts[True]) * 1e3,
            "pre_amx_step_ms": statistics.median(ts[False]) * 1e3, "profile": prof}


def graph_steps(model: Path, prompts, steps: int) -> float:
    """Median decode step ms with the engine's default: steps captured and replayed
    (graph.py), the AMX GEMM on."""
    from halserve import LLM, SamplingParams

    os.environ["HALSERVE_CPU_GRAPHS"] = "1"
    try:
        rows, plen = prompts.shape
        llm = LLM(str(model), backend="cpu_amx", dtype="bfloat16", max_num_seqs=rows,
                  max_model_len=plen + steps + 16, enable_prefix_caching=False)
        eng = llm.engine
        sp = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(rows):
            eng.add_request(str(i), prompts[i].tolist(), sp)
        started: set = set()
        while len(started) < rows:
            started |= {o.request_id for o in eng.step() if o.outputs and o.outputs[0].token_ids}
        eng.step()
        ts = []
        for _ in range(steps):
            t = time.perf_counter()
            eng.step()
            ts.append(time.perf_counter() - t)
        del llm, eng
        return statistics.median(ts) * 1e3
    finally:
        os.environ["HALSERVE_CPU_GRAPHS"] = "0"


def s5_steps(model: Path, prompts, steps: int, hf_model=None) -> dict:
    """Session 5's changes, before/after in one process, steps interleaved: engine A runs
    eagerly (what a 32/64-row step did before: buckets stopped at 16 rows) with the AVX-512
    attention span, the GEMM's even static split and 32-row W blocks at every M ("before"),
    and with the AMX span, blocks handed out one at a time and 16-row blocks above 32 rows
    ("+attention": session 5's kernels); engine B replays captured
    steps (buckets up to graph.GRAPH_MAX_ROWS) with the AMX span ("after"); HF's step (its
    forward with its KV cache, greedy) between them when ``hf_model`` is given. Median ms."""
    import torch

    from halserve import LLM, SamplingParams
    from halserve.hal.cpu_amx.perf import hf_step_ms as hf_ms

    rows, plen = prompts.shape
    engs = {}
    os.environ["HALSERVE_CPU_GRAPHS"] = "1"
    try:
        for eager in (True, False):
            llm = LLM(str(model), backend="cpu_amx", dtype="bfloat16", max_num_seqs=rows, enforce_eager=eager,
                      max_model_len=plen + 3 * steps + 24, enable_prefix_caching=False)
            eng = llm.engine
            if not eager and rows not in eng.runner.graphs:
                print(f"   {rows} rows: no captured bucket ({eng.hal.graph_refusal})", flush=True)
            sp = SamplingParams(temperature=0, max_tokens=3 * steps + 16, ignore_eos=True)
            for i in range(rows):
                eng.add_request(str(i), prompts[i].tolist(), sp)
            started: set = set()
            while len(started) < rows:
                started |= {o.request_id for o in eng.step() if o.outputs and o.outputs[0].token_ids}
            eng.step()
            engs[eager] = (llm, eng)
    finally:
        os.environ["HALSERVE_CPU_GRAPHS"] = "0"
    lib = engs[True][1].hal.lib
    # (eager, AMX attention span, dynamic GEMM blocks, W block rows: 32 = session 4's, 0 = default)
    runs = {"before": (True, 0, 0, 32), "+attention": (True, 1, 1, 0), "after": (False, 1, 1, 0)}
    ts: dict = {k: [] for k in runs}
    hf = None
    if hf_model is not None:
        hf = hf_ms(hf_model, prompts, max(2, steps // 2))
    for _ in range(steps):
        for k, (eager, attn, dyn, wrows) in runs.items():
            lib.hs_set_attn_amx(attn)
            lib.hs_set_amx_sched(dyn)
            lib.hs_set_amx_rows(wrows)
            t = time.perf_counter()
            engs[eager][1].step()
            ts[k].append(time.perf_counter() - t)
    lib.hs_set_attn_amx(1)
    lib.hs_set_amx_sched(1)
    lib.hs_set_amx_rows(0)
    if hf_model is not None:  # again after: the box's load drifts
        hf = min(hf, hf_ms(hf_model, prompts, max(2, steps // 2)))
    out = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
    out["hf"] = hf
    del engs
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="16,64")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--work-dir", default=None, help="folder of the random checkpoint (default: the perf tool's)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-graphs", action="store_true", help="skip the engine-default run (captured steps)")
    p.add_argument("--s5", action="store_true", help="only session 5's before/after (eager + AVX-512 attention "
                   "vs captured steps + AMX attention) beside HF, steps interleaved in one process")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch

    from halserve.bench.cpu import read_bandwidth_gbs
    from halserve.hal.cpu_amx.perf import SHAPE_1B, _checkpoint

    shape = dict(SHAPE_1B, num_hidden_layers=a.layers)
    if a.work_dir:  # where `halserve bench cpu` / cpugraph.py write theirs: one there is reused
        from halserve.bench.cpu_ckpt import write_random

        model = write_random(Path(a.work_dir) / f"cpu-1.1b-L{a.layers}-V{shape['vocab_size']}-random-bf16", shape)
    else:
        model = _checkpoint(shape)
    bw = read_bandwidth_gbs()
    h, i, L = shape["hidden_size"], shape["intermediate_size"], a.layers
    wbytes = 2 * (L * (h * (h + 2 * h // 8) + h * h + 3 * h * i) + shape["vocab_size"] * h)
    floor_ms = wbytes / (bw * 1e9) * 1e3
    print(f"threads {torch.get_num_threads()}  read bandwidth {bw:.1f} GB/s  weights {wbytes / 1e9:.2f} GB "
          f"-> read floor {floor_ms:.1f} ms a step", flush=True)
    res = {"threads": torch.get_num_threads(), "read_gbs": bw, "weight_bytes": wbytes, "floor_ms": floor_ms,
           "layers": L, "prompt": a.prompt, "runs": []}
    if a.s5:
        from transformers import AutoModelForCausalLM

        hfm = None if a.no_hf else AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
        print("| rows | HF ms | before ms | eager, session 5's kernels ms | after (graphs + AMX attention) ms | after tok/s | "
              "x before | x HF | floor / step |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
        for rows in [int(r) for r in a.rows.split(",") if r.strip()]:
            g = torch.Generator().manual_seed(0)
            prompts = torch.randint(3, shape["vocab_size"], (rows, a.prompt), generator=g)
            try:
                r = s5_steps(model, prompts, a.steps, hfm)
            except Exception as e:  # one size failing must not lose the others
                print(f"s5 {rows}: {type(e).__name__}: {e}", flush=True)
                continue
            hf = r["hf"] or float("nan")
            print(f"| {rows} | {hf:.1f} | {r['before']:.1f} | {r['+attention']:.1f} | {r['after']:.1f} | "
                  f"{rows / r['after'] * 1e3:.0f} | {r['before'] / r['after']:.2f} | {hf / r['after']:.2f} | "
                  f"{floor_ms / r['after']:.2f} |", flush=True)
            res["runs"].append(dict(r, rows=rows))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return 0
    print("| rows | HF step ms | pre-AMX step ms | AMX step ms | AMX tok/s | x HF | x pre-AMX | floor / step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for rows in [int(r) for r in a.rows.split(",") if r.strip()]:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, shape["vocab_size"], (rows, a.prompt), generator=g)
        row: dict = {"rows": rows}
        try:
            row["hf_step_ms"] = None if a.no_hf else hf_step_ms(model, prompts, a.steps)
        except Exception as e:  # the peer failing must not lose our figures
            print(f"HF {rows}: {type(e).__name__}: {e}", flush=True)
            row["hf_step_ms"] = None
        try:
            row.update(halserve_steps(model, prompts, a.steps, a.profile_steps))
        except Exception as e:
            print(f"halserve {rows}: {type(e).__name__}: {e}", flush=True)
            res["runs"].append(row)
            continue
        hf = row["hf_step_ms"]
        amx, pre = row["amx_step_ms"], row["pre_amx_step_ms"]
        print(f"| {rows} | {hf or float('nan'):.1f} | {pre:.1f} | {amx:.1f} | {rows / amx * 1e3:.0f} | "
              f"{(hf / amx) if hf else float('nan'):.2f} | {pre / amx:.2f} | {floor_ms / amx:.2f} |", flush=True)
        for k, pr in row["profile"].items():
            top = ", ".join(f"{n} {v:.1f}" for n, v in list(pr["ops_ms"].items())[:8])
            print(f"   {k}: step {pr['step_ms']:.1f} ms = outside ops {pr['outside_ops_ms']:.1f} + {top}", flush=True)
        if not a.no_graphs:
            try:
                gm = row["graph_step_ms"] = graph_steps(model, prompts, a.steps)
                print(f"   engine default (captured steps, AMX on): step {gm:.1f} ms, {rows / gm * 1e3:.0f} tok/s, "
                      f"{(hf / gm) if hf else float('nan'):.2f}x HF, {floor_ms / gm:.2f} of the read floor", flush=True)
            except Exception as e:
                print(f"graphs {rows}: {type(e).__name__}: {e}", flush=True)
        res["runs"].append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
