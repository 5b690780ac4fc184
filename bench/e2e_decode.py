"""End-to-end decode through ``LLM.generate`` as a user sees it, by variant (issue 20's table).

For each variant (bf16, fp8 W8A8, and both in batch-invariant mode) on one random checkpoint:
batch-1 decode ms/token = (time of a 1024-token prompt + N greedy tokens - time of the same
with 1 token) / (N - 1), median of 3; and batch-B output tokens/s (B prompts at once): ``bB_tok_s``
on prompts the warm-up already prefilled (prefix-cache hits: decode-bound, the best of 2) and
``bB_cold_tok_s`` on prompts never seen (their prefill timed too, as a user's first request). The
roofline is the bytes a decode step reads (weights once + the KV cache at the mean context)
over the device's measured read bandwidth (an fp32 sum over 4 GiB), in the same run; HF
transformers ``generate`` on the same checkpoint is the peer.

    python bench/e2e_decode.py --preset llama-8b --variants bf16,fp8,bf16-bi,fp8-bi --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from halserve.bench.latency import card_name, ensure_checkpoint, hf_config, hf_decode_ms, variant_options
from halserve.bench.throughput import decode_step_bytes, read_bw_gbs


def kernel_table(timed, prompts, steps: int, top: int = 25) -> dict:
    """GPU kernels of one decode step at len(prompts) rows: torch.profiler over a generate of
    1 token (prefill + first token) and of 1 + ``steps`` tokens, per-kernel time difference
    / ``steps``. Also the prefill's top kernels. Times in us."""
    from torch.profiler import ProfilerActivity, profile

    def run(n):
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            timed(n, prompts)
        agg: dict = {}
        for e in p.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                t, c = agg.get(e.name, (0.0, 0))
                agg[e.name] = (t + e.time_range.elapsed_us(), c + 1)
        return agg

    one, many = run(1), run(1 + steps)
    step = {}
    for name, (t, c) in many.items():
        t0, c0 = one.get(name, (0.0, 0))
        if t - t0 > 0:
            step[name[:120]] = (round((t - t0) / steps, 2), round((c - c0) / steps, 2))
    rank = sorted(step.items(), key=lambda kv: -kv[1][0])
    pre = sorted(one.items(), key=lambda kv: -kv[1][0])
    return {"step_kernel_us": round(sum(v[0] for v in step.values()), 1),
            "step": [{"kernel": k, "us": v[0], "calls": v[1]} for k, v in rank[:top]],
            "prefill_kernel_us": round(sum(v[0] for v in one.values()), 1),
            "prefill": [{"kernel": k[:120], "us": round(v[0], 1), "calls": v[1]} for k, v in pre[:12]]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--variants", default="bf16,fp8,bf16-bi,fp8-bi")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", help="batch sizes for output tok/s, e.g. 64,128,256 (default: --batch)")
    ap.add_argument("--bi-batches", help="batch sizes of the -bi variants (default: --batches)")
    ap.add_argument("--profile", type=int, default=0, help="kernel table of one decode step at batch 1 and "
                    "the first batch size, from this many profiled steps (0: off)")
    ap.add_argument("--hf-peer", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="auto | fp8 (e4m3 KV cache), or a list (auto,fp8): each variant runs with each")
    ap.add_argument("--num-layers", type=int, default=None, help="the preset's shape with fewer layers (quick runs)")
    ap.add_argument("--json")
    args = ap.parse_args()
    batches = [int(b) for b in (args.batches or str(args.batch)).split(",")]
    bi_batches = [int(b) for b in args.bi_batches.split(",")] if args.bi_batches else batches
    args.model, args.workdir = None, None
    from halserve import LLM, SamplingParams

    path = ensure_checkpoint(args)
    _, cfg = hf_config(args.preset, args.num_layers)
    bw = read_bw_gbs()
    print(f"[e2e] {card_name()} read {bw:.0f} GB/s; {args.preset}, {args.input_len} in / {args.output_len} out",
          flush=True)
    g = torch.Generator().manual_seed(0)
    prompt = {"prompt_token_ids": torch.randint(3, cfg.vocab_size, (args.input_len,), generator=g).tolist()}
    batch = [{"prompt_token_ids": torch.randint(3, cfg.vocab_size, (args.input_len,), generator=g).tolist()}
             for _ in range(max(batches + bi_batches))]
    rows = []
    for kvd, v in [(k, v) for k in args.kv_cache_dtype.split(",") for v in args.variants.split(",")]:
        t0 = time.perf_counter()
        llm = LLM(str(path), dtype="bfloat16", max_model_len=args.input_len + args.output_len + 16,
                  max_num_seqs=max(batches + bi_batches + [1]), kv_cache_dtype=kvd, **variant_options(v))
        print(f"[e2e] {v} kv={kvd}: engine up in {time.perf_counter() - t0:.1f}s", flush=True)

        def timed(n, prompts):
            sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate(prompts, sp)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        timed(args.output_len, [prompt])  # warm-up: graphs, autotune
        diffs = [(timed(args.output_len, [prompt]) - timed(1, [prompt])) / (args.output_len - 1) for _ in range(3)]
        ms = statistics.median(diffs) * 1e3
        mine = bi_batches if "bi" in v.split("-") else batches
        bts, cold = {}, {}
        for b in mine:
            # two short runs first, so no Triton compile is timed: the first prefills the prompts
            # (a prefix-cache miss), the second takes the path the timed runs take (a full prefix
            # hit: each prompt's last token is computed again beside the others)
            timed(2, batch[:b])
            timed(2, batch[:b])
            bts[b] = min(timed(args.output_len, batch[:b]) for _ in range(2))
            if b > 1:  # as a user sees it: prompts never seen (their prefill is timed too)
                fresh = [{"prompt_token_ids": torch.randint(3, cfg.vocab_size, (args.input_len,),
                                                            generator=g).tolist()} for _ in range(b)]
                cold[b] = timed(args.output_len, fresh)
        wbytes = 1 if v.startswith("fp8") else 2
        ctx = args.input_len + args.output_len // 2
        step = decode_step_bytes(cfg, wbytes, ctx)
        if kvd.startswith("fp8"):  # the KV part of a step's bytes (counted at 2 a value) halves
            step -= (step - decode_step_bytes(cfg, wbytes, 0)) / 2
        floor_ms = step / bw / 1e6
        row = {"variant": v, "kv_cache_dtype": kvd, "b1_ms_per_token": round(ms, 3),
               "b1_pct_roofline": round(100 * floor_ms / ms, 1),
               **{f"b{b}_tok_s": round(b * args.output_len / t, 1) for b, t in bts.items()},
               **{f"b{b}_cold_tok_s": round(b * args.output_len / t, 1) for b, t in cold.items()}}
        print("[e2e]", json.dumps(row), flush=True)
        if args.profile:
            for b in (1, mine[0]):
                try:
                    row[f"kernels_b{b}"] = kt = kernel_table(timed, batch[:b] if b > 1 else [prompt], args.profile)
                    print(f"[e2e] {v} b{b} one step: {kt['step_kernel_us']} us of kernels;",
                          "; ".join(f"{r['kernel'][:60]} {r['us']}us x{r['calls']}" for r in kt["step"][:8]), flush=True)
                except Exception as e:  # the timings above stand without it
                    row[f"kernels_b{b}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        if args.json:  # a later variant's failure or timeout keeps this one
            with open(args.json, "w") as f:
                json.dump({"card": card_name(), "read_GBs": bw, "partial": True, "rows": rows}, f, indent=1)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    base = {r["variant"]: r for r in rows if r["kv_cache_dtype"] == "auto"}
    for r in rows:
        ref = base.get("fp8" if r["variant"] == "fp8-bi" else "bf16")
        if ref and ref is not r and r["kv_cache_dtype"] == "auto":
            r["b1_vs_ref"] = round(ref["b1_ms_per_token"] / r["b1_ms_per_token"], 3)
        auto = base.get(r["variant"])
        if auto and auto is not r:  # the same variant with the model-dtype cache: speed-up of this cache
            r["b1_vs_auto_kv"] = round(auto["b1_ms_per_token"] / r["b1_ms_per_token"], 3)
            key = f"b{args.batch}_tok_s"
            r[f"b{args.batch}_vs_auto_kv"] = round(r[key] / auto[key], 3)
    out = {"card": card_name(), "read_GBs": bw, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.hf_peer:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
        out["hf_ms_per_token"] = hf_decode_ms(hf, args.input_len, args.output_len)
        print(f"[e2e] HF transformers: {out['hf_ms_per_token']:.2f} ms/token", flush=True)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
