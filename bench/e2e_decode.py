"""End-to-end decode through ``LLM.generate`` as a user sees it, by variant (issue 20's table).

For each variant (bf16, fp8 W8A8, and both in batch-invariant mode) on one random checkpoint:
batch-1 decode ms/token = (time of a 1024-token prompt + N greedy tokens - time of the same
with 1 token) / (N - 1), median of 3; and batch-B output tokens/s (B prompts at once). The
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

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--variants", default="bf16,fp8,bf16-bi,fp8-bi")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hf-peer", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.model, args.num_layers, args.workdir = None, None, None
    from halserve import LLM, SamplingParams

    path = ensure_checkpoint(args)
    _, cfg = hf_config(args.preset)
    bw = read_bw_gbs()
    print(f"[e2e] {card_name()} read {bw:.0f} GB/s; {args.preset}, {args.input_len} in / {args.output_len} out",
          flush=True)
    g = torch.Generator().manual_seed(0)
    prompt = {"prompt_token_ids": torch.randint(3, cfg.vocab_size, (args.input_len,), generator=g).tolist()}
    batch = [{"prompt_token_ids": torch.randint(3, cfg.vocab_size, (args.input_len,), generator=g).tolist()}
             for _ in range(args.batch)]
    rows = []
    for v in args.variants.split(","):
        t0 = time.perf_counter()
        llm = LLM(str(path), dtype="bfloat16", max_model_len=args.input_len + args.output_len + 16,
                  max_num_seqs=max(args.batch, 1), **variant_options(v))
        print(f"[e2e] {v}: engine up in {time.perf_counter() - t0:.1f}s", flush=True)

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
        bt = timed(args.output_len, batch)
        wbytes = 1 if v.startswith("fp8") else 2
        floor_ms = decode_step_bytes(cfg, wbytes, args.input_len + args.output_len // 2) / bw / 1e6
        row = {"variant": v, "b1_ms_per_token": round(ms, 3), "b1_pct_roofline": round(100 * floor_ms / ms, 1),
               f"b{args.batch}_tok_s": round(args.batch * args.output_len / bt, 1)}
        rows.append(row)
        print("[e2e]", json.dumps(row), flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    base = {r["variant"]: r for r in rows}
    for r in rows:
        ref = base.get("fp8" if r["variant"] == "fp8-bi" else "bf16")
        if ref and ref is not r:
            r["b1_vs_ref"] = round(ref["b1_ms_per_token"] / r["b1_ms_per_token"], 3)
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
