"""``halserve bench cpu``: CPU decode beside llama.cpp and HF transformers, same weights,
same threads, one sitting.

Per engine: batch-1 decode tokens/s (time for N tokens minus time for 1, so prefill drops
out), prompt prefill tokens/s, and decode tokens/s of ``--batch`` sequences at once.
Roofline: weight bytes one decode step reads / a measured multi-threaded read (torch sum
over 1 GiB: a decode reads, it does not copy). Every figure is printed with its ratio to
the roofline and to the peers run beside it."""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

SHAPES = {
    "1.1b": None,  # TinyLlama (bench.startup.TINYLLAMA_SHAPE)
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint dir (default: a random Llama of --shape, bf16)")
    p.add_argument("--shape", default="1.1b", choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quant", default="none,int8,int4",
                   help="comma list of halserve quantizations on cpu_amx (none, int8, int8_w8a8, int4...)")
    p.add_argument("--backends", default="cpu_amx,native")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: torch's)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=32, help="sequences in the batched decode (0: skip)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--llama-cpp", default=None, help="an extracted llama.cpp archive dir (bin/, converter/)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--json", default=None)


def read_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _decode_rate(gen, n: int, rows: int, repeats: int) -> tuple[float, float]:
    """(decode tokens/s over ``rows`` sequences, seconds for the 1-token run)."""
    rates, firsts = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        gen(1)
        one = time.perf_counter() - t
        t = time.perf_counter()
        gen(n)
        rates.append(rows * (n - 1) / (time.perf_counter() - t - one))
        firsts.append(one)
    return statistics.median(rates), statistics.median(firsts)


def _prompts(vocab: int, rows: int, length: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(rows)]


def run_halserve(model: Path, backend: str, quant: str, args) -> dict:
    from halserve import LLM, SamplingParams
    from halserve.bench.latency import weight_bytes_per_token

    rows = max(args.batch, 1)
    llm = LLM(str(model), backend=backend, dtype=args.dtype, quantization=None if quant == "none" else quant,
              max_num_seqs=rows, max_model_len=args.input_len + args.output_len + 16,
              enable_prefix_caching=False)
    eng = llm.engine
    prompts = _prompts(eng.model_config.vocab_size, rows, args.input_len)

    def gen(ps):
        return lambda k: llm.generate(ps, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))

    gen(prompts[:1])(2)  # warm-up
    tok_s, first = _decode_rate(gen(prompts[:1]), args.output_len, 1, args.repeats)
    row = {"engine": f"halserve {backend}", "backend": eng.hal.name, "quant": quant,
           "weight_bytes": weight_bytes_per_token(eng.model), "decode_tok_s": tok_s,
           "prefill_tok_s": args.input_len / first, "describe": eng.hal.describe()}
    if args.batch:
        row["batch_decode_tok_s"], _ = _decode_rate(gen(prompts), args.output_len, rows, 1)
    del llm, eng
    gc.collect()
    return row


def run_hf(model: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype)).eval()
    vocab = hf.config.vocab_size
    rows = max(args.batch, 1)
    ids = torch.tensor(_prompts(vocab, rows, args.input_len))

    def gen(x):
        def run(k):
            with torch.no_grad():
                hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                            do_sample=False, pad_token_id=0)
        return run

    gen(ids[:1])(2)
    tok_s, first = _decode_rate(gen(ids[:1]), args.output_len, 1, args.repeats)
    wbytes = sum(t.numel() * t.element_size() for t in hf.parameters())  # it reads them all per token
    row = {"engine": "HF transformers", "quant": "none", "decode_tok_s": tok_s, "prefill_tok_s": args.input_len / first,
           "weight_bytes": wbytes - hf.get_input_embeddings().weight.numel() * hf.get_input_embeddings().weight.element_size()}
    if args.batch:
        row["batch_decode_tok_s"], _ = _decode_rate(gen(ids), args.output_len, rows, 1)
    del hf
    gc.collect()
    return row


def run_llama_cpp(root: Path, model: Path, quants: list[str], args, threads: int) -> list[dict]:
    from halserve.bench import cpu_peer as P

    work = P.workdir(model)
    base = P.convert(root, model, work, P.GGUF_TYPES[args.dtype])
    out = []
    kinds = [("none", base)]
    for q in quants:
        if q in P.QUANT_TYPES and P.QUANT_TYPES[q] not in [k for k, _ in kinds]:
            kinds.append((P.QUANT_TYPES[q], None))
    for kind, path in kinds:
        try:
            path = path or P.quantize(root, base, kind, threads)
            row = {"engine": "llama.cpp", "quant": kind if kind != "none" else P.GGUF_TYPES[args.dtype],
                   "weight_bytes": path.stat().st_size,
                   "decode_tok_s": P.tg_tokens_per_s(root, path, threads, args.output_len * 4)}
            if args.batch:
                row["batch_decode_tok_s"] = P.batched_decode_tokens_per_s(root, path, threads, args.batch,
                                                                          args.input_len, args.output_len)
        except Exception as e:  # one peer failing must not lose the rest of the table
            row = {"engine": "llama.cpp", "quant": kind, "error": str(e)[:200]}
        print(f"  {row}", flush=True)
        out.append(row)
    return out


def _peer_for(row: dict, rows: list[dict]) -> "dict | None":
    want = {"none": ("bf16", "f16", "f32"), "int8": ("q8_0",), "int8_w8a8": ("q8_0",), "int4": ("q4_0",)}
    for r in rows:
        if r["engine"] == "llama.cpp" and r.get("quant") in want.get(row["quant"], ()) and "decode_tok_s" in r:
            return r
    return None


def main(args: argparse.Namespace) -> int:
    import torch

    from halserve.bench.startup import DEFAULT_CKPT_DIR, ensure_tinyllama, write_random_llama

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.model:
        model = Path(args.model)
    elif args.shape == "1.1b":
        model = ensure_tinyllama(DEFAULT_CKPT_DIR)
    else:
        model = DEFAULT_CKPT_DIR.with_name(f"llama-{args.shape}-random-bf16")
        if not (model / "config.json").is_file():
            print(f"writing a random {args.shape} Llama checkpoint to {model} (once) ...", flush=True)
            write_random_llama(model, SHAPES[args.shape])
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    bw = read_bandwidth_gbs()
    print(f"halserve bench cpu: {model.name}, {threads} threads, read bandwidth {bw:.1f} GB/s, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    rows: list[dict] = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        for q in (quants if backend == "cpu_amx" else ["none"]):
            try:
                rows.append(run_halserve(model, backend, q, args))
            except Exception as e:
                rows.append({"engine": f"halserve {backend}", "quant": q, "error": f"{type(e).__name__}: {e}"[:200]})
            print(f"  {rows[-1]}", flush=True)
    if not args.no_hf:
        try:
            rows.append(run_hf(model, args))
        except Exception as e:
            rows.append({"engine": "HF transformers", "quant": "none", "error": f"{type(e).__name__}: {e}"[:200]})
        print(f"  {rows[-1]}", flush=True)
    if args.llama_cpp:
        try:
            rows += run_llama_cpp(Path(args.llama_cpp), model, quants, args, threads)
        except Exception as e:
            rows.append({"engine": "llama.cpp", "quant": "-", "error": f"{type(e).__name__}: {e}"[:200]})
    hf = next((r for r in rows if r["engine"] == "HF transformers" and "decode_tok_s" in r), None)
    print(f"\n| engine | quant | batch-1 tok/s | % of read roofline | x llama.cpp | x HF | "
          f"{args.batch or 'no'}-seq decode tok/s | x llama.cpp | x HF |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['quant']} | error: {r['error']} |")
            continue
        roof = r.get("weight_bytes", 0) * r["decode_tok_s"] / (bw * 1e9) * 100
        peer = _peer_for(r, rows) if not r["engine"].startswith("llama") else None
        r["pct_read_roofline"] = roof

        def ratio(key, other):
            return f"{r[key] / other[key]:.2f}" if other and key in other and key in r else "-"

        print(f"| {r['engine']} | {r['quant']} | {r['decode_tok_s']:.2f} | {roof:.0f}% | "
              f"{ratio('decode_tok_s', peer)} | {ratio('decode_tok_s', hf)} | "
              f"{r.get('batch_decode_tok_s', float('nan')):.1f} | {ratio('batch_decode_tok_s', peer)} | "
              f"{ratio('batch_decode_tok_s', hf)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "threads": threads, "read_GBps": bw,
                                               "rows": rows}, indent=2))
    return 0
