"""``halserve bench decode``: batch-1 decode ms/token on any backend (the CPU included),
against the memory-bandwidth roofline and HF transformers, in one process.

Decode time per token = (time for N tokens - time for 1 token) / (N - 1), so the prefill
drops out. Roofline = bytes one step must read (every packed weight once, MoE experts at
top_k/E, norms) / copy bandwidth measured here on the backend's device (read + write).
The peer is HF ``generate`` (greedy, same prompt, same dtype) timed the same way.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint dir (default: a random TinyLlama-shape 1.1B, bf16)")
    p.add_argument("--backend", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-hf-peer", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--json", default=None)


def copy_bandwidth_gbs(device, nbytes: int = 1 << 29) -> float:
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if src.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def _per_token(gen, n: int, repeats: int) -> float:
    """Median over repeats of (t(n tokens) - t(1 token)) / (n - 1), in ms."""
    import statistics

    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        gen(1)
        one = time.perf_counter() - t
        t = time.perf_counter()
        gen(n)
        samples.append((time.perf_counter() - t - one) / (n - 1) * 1e3)
    return statistics.median(samples)


def main(args: argparse.Namespace) -> int:
    import torch

    from halserve import LLM, SamplingParams
    from halserve.bench.latency import weight_bytes_per_token

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from halserve.bench.startup import DEFAULT_CKPT_DIR, ensure_tinyllama

        model = ensure_tinyllama(DEFAULT_CKPT_DIR)
    else:
        model = Path(args.model)
    n = args.output_len
    llm = LLM(str(model), backend=args.backend, dtype=args.dtype, max_num_seqs=1,
              max_model_len=args.input_len + n + 16, enable_prefix_caching=False)
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    prompt = torch.randint(3, vocab, (args.input_len,), generator=torch.Generator().manual_seed(0)).tolist()

    def ours(k):
        return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))

    ours(4)  # warm-up
    ms = _per_token(ours, n, args.repeats)
    wbytes = weight_bytes_per_token(eng.model)
    dev = eng.runner.device
    bw = copy_bandwidth_gbs(dev)
    roof_ms = wbytes / (bw * 1e9) * 1e3
    row = {"backend": eng.hal.name, "device": str(dev), "dtype": str(eng.model_config.dtype), "ms_per_token": ms,
           "weight_bytes": wbytes, "copy_GBps": bw, "roofline_ms": roof_ms, "pct_roofline": 100 * roof_ms / ms}
    hf_ms = None
    if not args.no_hf_peer:
        del llm, eng
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype)).to(dev).eval()
        ids = torch.tensor([prompt], device=dev)

        def peer(k):
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                            do_sample=False, pad_token_id=0)

        peer(4)
        hf_ms = _per_token(peer, n, args.repeats)
        row.update(hf_ms_per_token=hf_ms, x_hf=hf_ms / ms)
    print(f"\nbatch-1 decode, {model.name}, {args.input_len} in / {n} out, backend {row['backend']} on {dev}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"weights read per token {wbytes / 1e9:.3f} GB; copy bandwidth {bw:.1f} GB/s; roofline {roof_ms:.1f} ms")
    print(f"halserve: {ms:.1f} ms/token = {row['pct_roofline']:.0f}% of roofline"
          + (f"; HF transformers: {hf_ms:.1f} ms/token -> halserve is {row['x_hf']:.2f}x HF" if hf_ms else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    return 0
