"""Where a cpu_amx prefill spends its time, against HF transformers and the GEMM floor, and
the prefill paths before and after issue 22's session-3 changes, all in one run
(``python -m halserve.bench.cpu_prefill``).

For each ``--quant``: the engine's time to the first token of one ``--len``-token prompt
(``LLM.generate``, max_tokens=1, best of ``--repeats``) with this tree's paths ("now": long
sequences' attention through torch's flash kernel, quantized weights dequantized by C into
a kept buffer) and with the earlier ones ("before": every row in the C attention kernel,
torch's whole-weight dequantize per call; the C attention kernel itself is this tree's, so
"before" is faster than the commit before these changes was), alternated so load drift hits both; then the
"now" run's time per HAL op (linear by shape). HF: the model's forward over the prompt
(logits of the last token only), best of ``--repeats``. Floor: the linear FLOPs of the
prompt at torch's bf16 GEMM rate measured here on the model's largest weight."""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path


def _checkpoint(args) -> Path:
    if args.model:
        return Path(args.model)
    from halserve.bench.cpu import SHAPES
    from halserve.bench.cpu_ckpt import write_random

    shape = dict(SHAPES["1.1b"], num_hidden_layers=args.layers)
    return write_random(Path(args.work_dir) / f"cpu-1.1b-L{args.layers}-V32000-random-bf16", shape)


def _legacy(on: bool, saved: dict) -> None:
    """Switch the two prefill paths to what they were before (on) or back (off)."""
    import torch.nn.functional as F

    from halserve.hal.cpu_amx import prefill, quant

    if not saved:
        saved.update(long_q=prefill.LONG_Q, long_p=prefill.LONG_Q_PREFIX, tiled=quant.linear_tiled)
    prefill.LONG_Q = 1 << 30 if on else saved["long_q"]
    prefill.LONG_Q_PREFIX = (1 << 30, 0) if on else saved["long_p"]
    def whole(lib, x, w, kind, wp, sp, group, bias):
        return F.linear(x, quant.dequant_any(w, x.dtype), bias)

    quant.linear_tiled = whole if on else saved["tiled"]


def _op_times(hal, run) -> dict[str, float]:
    """Seconds per HAL op (linear keyed by its weight's N x K) over one ``run()``."""
    acc: dict[str, float] = collections.defaultdict(float)
    orig = {}
    for op in ("linear", "rms_norm", "rotary", "silu_and_mul", "write_kv", "rotary_write_kv", "attention", "sample"):
        f = orig[op] = getattr(hal, op)

        def timed(*a, _f=f, _op=op, **k):
            t = time.perf_counter()
            r = _f(*a, **k)
            key = f"linear {a[1].out_features}x{a[1].in_features}" if _op == "linear" and a[0].shape[0] > 1 else _op
            acc[key] += time.perf_counter() - t
            return r

        setattr(hal, op, timed)
    try:
        t = time.perf_counter()
        run()
        acc["(total)"] = time.perf_counter() - t
    finally:
        for op, f in orig.items():
            setattr(hal, op, f)
    return dict(acc)


def _hf(ck: Path, ids: list[int], repeats: int, floor_s: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16).eval()
    xi = torch.tensor([ids])
    best = float("inf")
    with torch.no_grad():
        for rep in range(repeats + 1):
            t = time.perf_counter()
            hf(xi, logits_to_keep=1)
            if rep:
                best = min(best, time.perf_counter() - t)
    print(f"HF transformers bf16 ({hf.config._attn_implementation}): prefill forward {best:.3f} s; "
          f"floor / HF {floor_s / best:.2f}", flush=True)


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model", default="", help="bf16 Llama checkpoint (default: a random TinyLlama-shape one)")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--work-dir", default="/tmp/halserve-bench")
    p.add_argument("--len", type=int, default=1024, dest="length")
    p.add_argument("--quant", default="none,int8,int4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-hf", action="store_true")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    ck = _checkpoint(args)
    ids = torch.randint(3, 32000, (args.length,), generator=torch.Generator().manual_seed(1)).tolist()
    cfg = __import__("json").loads((ck / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    x = torch.randn(args.length, h, dtype=torch.bfloat16)
    w = torch.randn(2 * inter, h, dtype=torch.bfloat16)
    F.linear(x, w)
    t = time.perf_counter()
    for _ in range(3):
        F.linear(x, w)
    peak = 3 * 2 * args.length * h * 2 * inter / (time.perf_counter() - t)
    flops = 2 * args.length * layers * (h * (h + 2 * kv) + h * h + 3 * h * inter)
    print(f"{ck.name}: {layers} layers, {args.length}-token prompt, {torch.get_num_threads()} threads; torch bf16 "
          f"GEMM {peak / 1e9:.0f} GFLOP/s -> linear floor {flops / peak:.3f} s", flush=True)

    from halserve import LLM, SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    saved: dict = {}
    for q in args.quant.split(","):
        llm = LLM(str(ck), backend="cpu_amx", dtype="bfloat16", quantization=None if q == "none" else q,
                  max_model_len=args.length + 64, enable_prefix_caching=False,
                  max_num_batched_tokens=max(2048, args.length), max_num_seqs=1)
        best = {"now": float("inf"), "before": float("inf")}
        for rep in range(args.repeats + 1):
            for mode in ("now", "before"):
                _legacy(mode == "before", saved)
                t = time.perf_counter()
                llm.generate([ids], sp)
                if rep:  # the first of each is a warm-up
                    best[mode] = min(best[mode], time.perf_counter() - t)
        _legacy(False, saved)
        print(f"cpu_amx {q}: TTFT now {best['now']:.3f} s, before {best['before']:.3f} s "
              f"({best['before'] / best['now']:.2f}x); floor / now {flops / peak / best['now']:.2f}", flush=True)
        ops = _op_times(llm.engine.hal, lambda: llm.generate([ids], sp))
        total = ops.pop("(total)")
        print("   " + "; ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))
              + f"; outside ops {(total - sum(ops.values())) * 1e3:.0f} ms (of {total * 1e3:.0f})", flush=True)
        del llm
        if q == args.quant.split(",")[0] and not args.no_hf:  # HF early: a time limit keeps it
            _hf(ck, ids, args.repeats, flops / peak)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
