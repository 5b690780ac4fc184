"""``halserve bench throughput``: offline throughput of the engine vs HF transformers generate.

``--num-prompts`` random-token prompts of ``--input-len`` tokens, each generating exactly
``--output-len`` tokens (greedy, ignore_eos), through ``LLM.generate`` with
``--max-num-seqs`` running at once. The HF peer runs ``generate`` on one batch of
``--hf-batch`` prompts of the same shape on the same card (HF has no continuous batching, so
its rate at that batch is its offline rate). Same checkpoints as ``bench latency``.

The floor (``% floor``): the workload's least possible time on this card, measured in the
same run: prefill FLOPs (weights and causal attention) at the measured bf16 GEMM peak, plus
every decode step (waves of ``--max-num-seqs`` sequences) at the larger of its FLOP time and
its byte time (weights once and every sequence's KV at that step's context, at the measured
read bandwidth). ``host us/step``: the engine's host time per step outside the runner.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from halserve.bench.latency import (add_common_arguments, build_hf_model, card_name, checkpoint_dir,
                                    ensure_checkpoint, hf_config, print_table, variant_options)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.set_defaults(output_len=128, input_len=1024)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--hf-batch", type=int, default=64, help="batch size of the HF generate peer")
    p.add_argument("--same-batch", action="store_true",
                   help="also run the first variant with max_num_seqs = --hf-batch (same batch as HF)")


def hf_throughput(hf_model, batch: int, input_len: int, output_len: int) -> dict:
    import torch

    ids = torch.randint(5, hf_model.config.vocab_size, (batch, input_len), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        hf_model.generate(ids[:2, :64], max_new_tokens=2, pad_token_id=0, eos_token_id=None)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf_model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        torch.cuda.synchronize()
    s = time.perf_counter() - t
    return dict(batch=batch, seconds=s, output_tok_s=batch * output_len / s,
                total_tok_s=batch * (input_len + output_len) / s)


def gemm_peak_tflops(n: int = 8192) -> float:
    """bf16 dense GEMM rate this card reaches (torch.matmul, square n)."""
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * n ** 3 / (time.perf_counter() - t) / 1e12


def read_bw_gbs(nbytes: int = 4 << 30) -> float:
    """Device read bandwidth: an fp32 sum over ``nbytes``."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    for _ in range(3):
        x.sum()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x.sum()
    torch.cuda.synchronize()
    return 10 * nbytes / (time.perf_counter() - t) / 1e9


def _dims(cfg) -> tuple[int, int, int, int, int]:
    """(layers, q width, kv width, layer weights, lm_head weights) of a dense HF config."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return layers, q, kv, layers * (h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size), cfg.vocab_size * h


def decode_step_bytes(cfg, wbytes: float, ctx: int, batch: int = 1) -> float:
    """Bytes one decode step reads: every weight once (lm_head in bf16) and each row's KV."""
    layers, _, kv, body, head = _dims(cfg)
    return body * wbytes + head * 2 + batch * layers * 2 * kv * ctx * 2


def workload_floor_s(cfg, num_prompts: int, input_len: int, output_len: int, max_num_seqs: int,
                     tflops: float, gbs: float, wbytes: float = 2.0) -> float:
    """The least time for ``num_prompts`` x (input_len in, output_len out) (module docstring)."""
    layers, q, _, body, head = _dims(cfg)
    params = body + head
    peak, bw = tflops * 1e12, gbs * 1e9
    attn = lambda ctx: 4 * layers * q * ctx  # QK^T and PV flops for one query at context ctx
    prefill = num_prompts * (2 * params * input_len + attn(input_len) * input_len / 2)
    total = prefill / peak
    left = num_prompts
    while left > 0:
        b = min(left, max_num_seqs)
        for i in range(output_len - 1):  # the first token comes with the prefill
            ctx = input_len + i
            flops = b * (2 * params + attn(ctx))
            total += max(flops / peak, decode_step_bytes(cfg, wbytes, ctx, b) / bw)
        left -= b
    return total


def run_engine(path: Path, args, variant: str, num_prompts: int, max_num_seqs: int) -> dict:
    import torch

    from halserve.engine.llm import LLM
    from halserve.engine.sampling import SamplingParams

    opts = variant_options(variant)
    llm = LLM(str(path), backend=args.backend, dtype=args.dtype, quantization=opts["quantization"],
              batch_invariant=opts["batch_invariant"], enforce_eager=opts["enforce_eager"],
              max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization,
              max_model_len=args.input_len + args.output_len + 16)
    g = torch.Generator().manual_seed(0)
    vocab = llm.get_tokenizer().vocab_size if llm.get_tokenizer() is not None else 32000
    prompts = [{"prompt_token_ids": torch.randint(5, min(vocab, 32000), (args.input_len,), generator=g).tolist()}
               for _ in range(num_prompts)]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    s = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    m = llm.engine.get_metrics()
    res = dict(variant=variant, max_num_seqs=max_num_seqs, num_prompts=num_prompts, seconds=s,
               output_tok_s=n_out / s, total_tok_s=(n_out + num_prompts * args.input_len) / s,
               requests_s=num_prompts / s, host_us_per_step=m.get("host_us_per_step"),
               steps=m.get("num_steps_total"))
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench throughput: needs a CUDA device")
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        variant_options(v)
    out: dict = dict(bench="throughput", card=card_name(), date=time.strftime("%Y-%m-%d"), preset=args.preset,
                     num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len)
    hf_model = None
    if not args.model and (args.hf_peer or not (checkpoint_dir(args) / "config.json").is_file()):
        hf_model = build_hf_model(args.preset, args.num_layers)
    path = ensure_checkpoint(args, hf_model)
    if args.hf_peer:
        if hf_model is None:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        out["hf"] = hf_throughput(hf_model, args.hf_batch, args.input_len, args.output_len)
        print(f"[bench] HF generate batch {args.hf_batch}: {out['hf']['output_tok_s']:.0f} output tok/s", flush=True)
    del hf_model
    gc.collect()
    torch.cuda.empty_cache()
    cfg = hf_config(args.preset, args.num_layers)[1] if not args.model else None
    if cfg is None:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
    out["gemm_tflops"], out["read_GBs"] = gemm_peak_tflops(), read_bw_gbs()
    print(f"[bench] {out['card']}: bf16 GEMM {out['gemm_tflops']:.0f} TFLOP/s, read {out['read_GBs']:.0f} GB/s",
          flush=True)
    rows = []
    for v in variants:
        r = run_engine(path, args, v, args.num_prompts, args.max_num_seqs)
        wb = 1.0 if variant_options(v)["quantization"] == "fp8" else 2.0
        r["floor_s"] = workload_floor_s(cfg, args.num_prompts, args.input_len, args.output_len, args.max_num_seqs,
                                        out["gemm_tflops"], out["read_GBs"], wb)
        r["pct_floor"] = 100 * r["floor_s"] / r["seconds"]
        if "hf" in out:
            r["x_hf"] = r["output_tok_s"] / out["hf"]["output_tok_s"]
        rows.append(r)
        print(f"[bench] {args.preset} {v}: {r['output_tok_s']:.0f} output tok/s, {r['total_tok_s']:.0f} total tok/s "
              f"({r['seconds']:.1f}s)", flush=True)
    if args.same_batch and variants:
        r = run_engine(path, args, variants[0], args.num_prompts, args.hf_batch)
        r["variant"] = f"{variants[0]}@{args.hf_batch}"
        if "hf" in out:
            r["x_hf"] = r["output_tok_s"] / out["hf"]["output_tok_s"]
        rows.append(r)
        print(f"[bench] {args.preset} {r['variant']}: {r['output_tok_s']:.0f} output tok/s", flush=True)
    base = {r["variant"]: r for r in rows}
    for r in rows:
        if "-bi" in r["variant"] and r["variant"].replace("-bi", "") in base:
            r["bi_overhead_pct"] = 100 * (base[r["variant"].replace("-bi", "")]["output_tok_s"] / r["output_tok_s"] - 1)
    out["rows"] = rows
    print_table(f"throughput {args.preset} on {out['card']} ({args.num_prompts} x ({args.input_len} in, "
                f"{args.output_len} out), max_num_seqs {args.max_num_seqs}; HF batch {args.hf_batch})", rows,
                [("variant", "variant", "s"), ("output tok/s", "output_tok_s", ".0f"), ("total tok/s", "total_tok_s", ".0f"),
                 ("seconds", "seconds", ".1f"), ("% floor", "pct_floor", ".0f"), ("host us/step", "host_us_per_step", ".0f"), ("x HF", "x_hf", ".1f"), ("BI overhead %", "bi_overhead_pct", ".1f")])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0
