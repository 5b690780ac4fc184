"""``halserve bench cpu``: CPU decode beside llama.cpp and HF transformers, same weights,
same threads, one sitting.

Per engine and bit width: batch-1 decode tokens/s (timed over the steps after the first
token: engine steps for halserve, a streamer's clock for HF, llama-bench tg for llama.cpp),
the time to the first token of a ``--ttft-len`` prompt, and the decode tokens/s of each
``--batch`` count of sequences at once (n over the median of the steps after every sequence's
first token, all n decoding in each: see ``_step_rate``). Roofline: weight bytes one decode
step reads / a measured multi-threaded read (torch sum over 1 GiB: a decode reads, it does not
copy). Every figure is printed with its ratio to the roofline and to the peers run beside it,
as markdown tables ready for docs/performance.md."""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import time
from pathlib import Path

SHAPES = {
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192),
    # Qwen3-30B-A3B's layer: 128 experts of 768, top 8, 32/4 heads of 128, q/k norms
    "qwen3-moe": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                      num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=8192, qk_norm=True),
}
QUANT_BITS = {"none": 16, "int8": 8, "int8_w8a8": 8}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip() and int(x) > 0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint dir (default: a random bf16 model of --shape)")
    p.add_argument("--shape", default="1.1b", choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="decoder layers of --shape (0: the shape's own)")
    p.add_argument("--experts", type=int, default=0, help="experts per MoE layer of --shape (0: the shape's own)")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary of --shape (0: the shape's own)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quant", default="none,int8,int4",
                   help="comma list of halserve quantizations on cpu_amx (none, int8, int8_w8a8, int4...); a "
                        "'+lm_head' suffix (int8+lm_head) quantizes the lm_head too, as llama.cpp's Q8_0/Q4_0 files do")
    p.add_argument("--backends", default="cpu_amx,native")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: torch's)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens of the batch-1 decode")
    p.add_argument("--output-len", type=int, default=32, help="tokens the batch-1 decode generates")
    p.add_argument("--ttft-len", type=int, default=0, help="prompt tokens of the time-to-first-token run (0: skip)")
    p.add_argument("--batch", default="32", help="comma list of sequence counts for the batched decode ('0': skip)")
    p.add_argument("--batch-input-len", type=int, default=0, help="prompt tokens per batched sequence (0: --input-len)")
    p.add_argument("--batch-output-len", type=int, default=16)
    p.add_argument("--batch-quants", default="none", help="halserve quantizations that also run batched")
    p.add_argument("--batch-mode", default="interleaved", choices=["interleaved", "sequential"],
                   help="interleaved: every engine loaded at once, one decode step of each in turn (the same "
                   "load for all: halserve/bench/cpu_batched.py); sequential: each engine's own run, one after another")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--llama-cpp", default=None, help="an extracted llama.cpp archive dir (bin/, converter/)")
    p.add_argument("--gguf", default="bf16,q8_0,q4_0",
                   help="llama.cpp weight types to run (bf16, f16, f32 converted; q8_0, q4_0 quantized from them)")
    p.add_argument("--batch-gguf", default="bf16", help="llama.cpp types that also run llama-batched-bench")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--work-dir", default=None,
                   help="where random checkpoints and GGUF files go (default: ~/.cache/halserve/bench and the temp dir)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="also append the tables to this file")


def read_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """The read roofline: a multi-threaded sum over ``nbytes`` (best of 8: it varies by ~20%
    from run to run on the AMX host, and a roofline should not be beaten by noise)."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(8):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _decode_rate(gen, n: int, repeats: int) -> float:
    """Decode tokens/s: ``gen(n)`` returns (tokens, seconds) of its steps after every sequence
    had its first token, so no prefill is in it (a difference of two runs, t(N) - t(1), was:
    a quantized prefill that dequantizes every weight varies by more than a short decode takes)."""
    rates = []
    for _ in range(repeats):
        tokens, secs = gen(n)
        rates.append(tokens / secs if secs > 0 else float("nan"))
    return statistics.median(rates)


def _step_rate(run, n: int) -> float:
    """n sequences' decode tokens/s from the median of the last ``run``'s timed steps (each
    decodes all n: the halserve engine gets a token budget that starts them together). On a
    shared box a burst of another job's load stretches some steps many times over (each
    parallel region waits for a descheduled thread), and the engines run minutes apart:
    the mean (kept as ``batch_mean``) then ranks the load, the median the engine."""
    return n / statistics.median(run.step_secs) if run.step_secs else float("nan")


def _ttft(gen) -> float:
    """Seconds to the first token: best of two (the first may build kernels for the new
    shape), one only when it took over 2 s (a build is not what makes it that slow)."""
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        gen(1)
        best = min(best, time.perf_counter() - t)
        if best > 2.0:
            break
    return best


def _prompts(vocab: int, rows: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(rows)]


def _bits(quant: str, dtype: str) -> int:
    if quant == "none":
        return 32 if dtype == "float32" else 16
    return QUANT_BITS.get(quant, 4 if quant.startswith("int4") else 8)


def _llm(model: Path, backend: str, quant: str, args, batches: list[int]):
    from halserve import LLM

    blen = args.batch_input_len or args.input_len
    max_len = max(args.input_len + args.output_len, blen + args.batch_output_len, args.ttft_len + 1) + 16
    # A token budget that holds every batched prompt: all sequences prefill in one step and
    # then decode together, as HF's generate does. Under the default 2048 a 32 x 128 prefill
    # splits unevenly, one sequence starts a step late, and the timed steps end with a
    # half batch and a 1-row step: a weight read each for a few tokens (about 4% of the
    # figure at 2 threads), which is not the rate of n sequences decoding at once.
    scheme, lm_head = quant.removesuffix("+lm_head"), quant.endswith("+lm_head")
    llm = LLM(str(model), backend=backend, dtype=args.dtype, quantization=None if scheme == "none" else scheme,
              quantize_lm_head=lm_head,
              max_num_seqs=max(batches + [1]), max_model_len=max_len, enable_prefix_caching=False,
              max_num_batched_tokens=max([2048, args.ttft_len] + [n * blen for n in batches]))
    return llm


def run_halserve(model: Path, backend: str, quant: str, args, row: dict) -> None:
    """Fill ``row`` figure by figure (a time limit keeps what was measured): batch 1, batched
    (``--batch-mode sequential``; interleaved: ``run_batched_interleaved``), then the TTFT
    (slowest with quantized weights)."""
    from halserve import SamplingParams
    from halserve.bench.latency import weight_bytes_per_token

    # interleaved: run_batched_interleaved loads engines of its own for the batched figures
    batched = quant in args.batch_quants.split(",") and args.batch_mode == "sequential"
    batches = _ints(args.batch) if batched else []
    blen = args.batch_input_len or args.input_len
    t = time.perf_counter()
    llm = _llm(model, backend, quant, args, batches)
    eng = llm.engine
    load_s = time.perf_counter() - t
    vocab = eng.model_config.vocab_size

    ids = iter(range(1 << 30))

    def gen(ps):
        def run(k):
            """(tokens, seconds) of the engine steps after the last sequence's first token."""
            sp = SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
            got = {}
            for p in ps:
                rid = f"bench-{next(ids)}"
                eng.add_request(rid, p, sp, output_kind="delta")
                got[rid] = 0
            tokens, secs, t, rows, run.step_secs = 0, 0.0, time.perf_counter(), [], []
            while eng.has_unfinished():
                started = all(got.values())
                outs = eng.step()
                now = time.perf_counter()
                if eng.failed:  # a failed request would make a fast, meaningless figure
                    rid, (_, err) = eng.failed.popitem()
                    raise RuntimeError(f"request {rid} failed: {err}")
                new = 0
                for o in outs:
                    got[o.request_id] += len(o.outputs[0].token_ids)
                    new += len(o.outputs[0].token_ids)
                if started:
                    tokens, secs = tokens + new, secs + now - t
                    rows.append(new)
                    run.step_secs.append(now - t)
                t = now
            if any(v != k for v in got.values()):
                raise RuntimeError(f"a request ended with {min(got.values())} of {k} tokens")
            run.timed_rows = rows  # k - 1 steps of every sequence when they decode in lockstep
            return tokens, secs
        return run

    one = _prompts(vocab, 1, args.input_len)
    gen(one)(2)  # warm-up
    row.update(backend=eng.hal.name, weight_bytes=weight_bytes_per_token(eng.model), load_s=load_s,
               describe=eng.hal.describe(), graphs=sorted(eng.runner.graphs))
    if getattr(eng.hal, "graph_refusal", None):  # why a decode bucket runs eagerly (a slow step's first suspect)
        row["last_graph_refusal"] = eng.hal.graph_refusal
    row["decode_tok_s"] = _decode_rate(gen(one), args.output_len, args.repeats)
    for n in batches:
        g = gen(_prompts(vocab, n, blen, seed=2))
        row.setdefault("batch_mean", {})[n] = _decode_rate(g, args.batch_output_len, 1)
        row["batch"][n] = _step_rate(g, n)
        r = g.timed_rows or [0]
        row.setdefault("batch_rows", {})[n] = f"{len(g.timed_rows)} steps of {min(r)}-{max(r)} rows"
    if args.ttft_len:
        row["ttft_s"] = _ttft(gen(_prompts(vocab, 1, args.ttft_len, seed=1)))
    del llm, eng
    gc.collect()


def run_hf(model: Path, args, row: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype)).eval()
    vocab = hf.config.vocab_size

    class Clock:
        """A generate() streamer that only notes when each step's tokens arrive (the first
        put() is the prompt)."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def gen(ids):
        x = torch.tensor(ids)

        def run(k):
            clock = Clock()
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                                  do_sample=False, pad_token_id=0, streamer=clock)
            if out.shape[1] != x.shape[1] + k or len(clock.times) != k + 1:
                raise RuntimeError(f"HF generated {out.shape[1] - x.shape[1]} of {k} tokens")
            run.step_secs = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
            return len(ids) * (k - 1), clock.times[-1] - clock.times[1]
        return run

    one = _prompts(vocab, 1, args.input_len)
    gen(one)(2)
    emb = hf.get_input_embeddings().weight
    row["weight_bytes"] = sum(t.numel() * t.element_size() for t in hf.parameters()) - emb.numel() * emb.element_size()
    row["decode_tok_s"] = _decode_rate(gen(one), args.output_len, args.repeats)
    blen = args.batch_input_len or args.input_len
    for n in _ints(args.batch) if args.batch_mode == "sequential" else []:
        g = gen(_prompts(vocab, n, blen, seed=2))
        row.setdefault("batch_mean", {})[n] = _decode_rate(g, args.batch_output_len, 1)
        row["batch"][n] = _step_rate(g, n)
    if args.ttft_len:
        row["ttft_s"] = _ttft(gen(_prompts(vocab, 1, args.ttft_len, seed=1)))
    del hf
    gc.collect()


def run_batched_interleaved(model: Path, args, rows: list[dict]) -> None:
    """The batched figures of every halserve row that runs batched and of HF's row, with all
    the engines loaded at once and stepped in turn (halserve/bench/cpu_batched.py)."""
    from halserve.bench.cpu_batched import interleaved

    batches = _ints(args.batch)
    ours = {r["engine"] + ("" if r["quant"] == "none" else f" {r['quant']}"): r for r in rows
            if r["engine"].startswith("halserve") and r["quant"] in args.batch_quants.split(",") and "error" not in r}
    hf = next((r for r in rows if r["engine"] == "HF transformers" and "error" not in r), None)
    if not batches or not (ours or hf):
        return
    llms = {}
    try:
        for label, r in ours.items():
            llms[label] = _llm(model, r["backend"], r["quant"], args, batches)
        vocab = next(iter(llms.values())).engine.model_config.vocab_size if llms else \
            json.loads((model / "config.json").read_text())["vocab_size"]
        for n in batches:
            got = interleaved(model, llms, hf is not None, args.dtype, n,
                              _prompts(vocab, n, args.batch_input_len or args.input_len, seed=2),
                              max(args.batch_output_len - 1, 1))
            for label, res in got.items():
                row = hf if label == "HF transformers" else ours[label]
                row["batch"][n] = res["tok_s"]
                row.setdefault("batch_step_ms", {})[n] = res["step_ms_all"]
            print(f"  {n} sequences, interleaved: " + ", ".join(f"{k} {v['tok_s']:.1f} tok/s" for k, v in got.items()),
                  flush=True)
    except Exception as e:  # the batch-1 figures above stay
        for r in list(ours.values()) + ([hf] if hf else []):
            r["error"] = f"batched: {type(e).__name__}: {e}"[:200]
    finally:
        del llms
        gc.collect()


def run_llama_cpp(root: Path, model: Path, args, threads: int, expert_fraction: float, out: list[dict]) -> None:
    """Append a row per ``--gguf`` type to ``out`` (as each starts: a time limit keeps what it measured)."""
    from halserve.bench import cpu_peer as P

    for kind in [k.strip() for k in args.gguf.split(",") if k.strip()]:
        row = {"engine": "llama.cpp", "quant": kind, "bits": P.BITS.get(kind, 0), "batch": {}}
        out.append(row)
        try:
            t = time.perf_counter()
            path = P.gguf(root, model, kind, threads, args.work_dir)
            row["prepare_s"] = time.perf_counter() - t
            row["weight_bytes"] = P.bytes_per_token(root, path, expert_fraction)
            r = P.bench(root, path, threads, args.output_len, args.ttft_len, reps=max(args.repeats, 1))
            row["decode_tok_s"], row["repack"] = r["decode_tok_s"], r["repack"]
            if args.ttft_len:
                row["ttft_s"], row["pp_repack"] = args.ttft_len / r["prefill_tok_s"], r["pp_repack"]
            if kind in args.batch_gguf.split(",") and _ints(args.batch):
                b = P.batched(root, path, threads, _ints(args.batch), args.batch_input_len or args.input_len,
                              args.batch_output_len)
                row["batch"], row["batch_repack"] = b["tok_s"], b["repack"]
        except Exception as e:  # one peer failing must not lose the rest of the table
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        print(f"  {_short(row)}", flush=True)


class _Stopped(BaseException):
    """SIGTERM (the device step's time limit): not an Exception, so no per-row handler eats it."""


def _stop(*_):
    raise _Stopped


def _short(row: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "describe"}


def _checkpoint(args) -> Path:
    from halserve.bench.cpu_ckpt import write_random
    from halserve.bench.startup import DEFAULT_CKPT_DIR

    if args.model:
        return Path(args.model)
    shape = dict(SHAPES[args.shape])
    for key, name in (("layers", "num_hidden_layers"), ("experts", "num_experts"), ("vocab", "vocab_size")):
        if getattr(args, key):
            if name not in shape:
                raise SystemExit(f"--{key} does not apply to --shape {args.shape}")
            shape[name] = getattr(args, key)
    tag = f"{args.shape}-L{shape['num_hidden_layers']}-V{shape['vocab_size']}" + (
        f"-E{shape['num_experts']}" if shape.get("num_experts") else "")
    return write_random(Path(args.work_dir or DEFAULT_CKPT_DIR.parent) / f"cpu-{tag}-random-bf16", shape)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main(args: argparse.Namespace) -> int:
    import torch

    from halserve.bench.cpu_table import cpu_tables

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = _checkpoint(args)
    cfg = json.loads((model / "config.json").read_text())
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    expert_fraction = cfg["num_experts_per_tok"] / experts if experts else 1.0
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    bw = read_bandwidth_gbs()
    head = (f"{model.name}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}"
            + (f", {experts} experts top {cfg['num_experts_per_tok']}" if experts else "")
            + f"; {_cpu_name()}, {threads} threads, read roofline {bw:.1f} GB/s; "
            + f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f}")
    print(f"halserve bench cpu: {head}", flush=True)
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, _stop)  # a time limit still gets the table of what ran
    ours = [(b.strip(), q) for b in args.backends.split(",") if b.strip()
            for q in (quants if b.strip() == "cpu_amx" else ["none"])]

    def run_ours(todo):
        for backend, q in todo:
            rows.append({"engine": f"halserve {backend}", "quant": q, "bits": _bits(q, args.dtype), "batch": {}})
            try:
                run_halserve(model, backend, q, args, rows[-1])
            except Exception as e:
                rows[-1]["error"] = f"{type(e).__name__}: {e}"[:200]
            print(f"  {_short(rows[-1])}", flush=True)

    # the 16-bit rows and every peer first: under a time limit the slow quantized prefills go last
    try:
        run_ours([o for o in ours if o[1] == "none"])
        if not args.no_hf:
            rows.append({"engine": "HF transformers", "quant": "none", "bits": _bits("none", args.dtype), "batch": {}})
            try:
                run_hf(model, args, rows[-1])
            except Exception as e:
                rows[-1]["error"] = f"{type(e).__name__}: {e}"[:200]
            print(f"  {_short(rows[-1])}", flush=True)
        # interleaved batching steps the rows that exist: with a quantized --batch-quants it waits
        # for the quantized rows (run last), else its int8/int4 figures would silently be missing
        late = any(q != "none" and q in args.batch_quants.split(",") for _, q in ours)
        if args.batch_mode == "interleaved" and not late:
            run_batched_interleaved(model, args, rows)
        if args.llama_cpp:
            run_llama_cpp(Path(args.llama_cpp), model, args, threads, expert_fraction, rows)
        run_ours([o for o in ours if o[1] != "none"])
        if args.batch_mode == "interleaved" and late:
            run_batched_interleaved(model, args, rows)
    except _Stopped:
        rows.append({"engine": "(stopped)", "quant": "-", "error": "time limit reached: what is missing above and "
                     "every later row did not run"})
    order = {"halserve": 0, "HF transformers": 1, "llama.cpp": 2}
    rows.sort(key=lambda r: order.get(r["engine"].split(" ")[0] if r["engine"].startswith("halserve")
                                      else r["engine"], 3))
    text = cpu_tables(rows, bw, args, head)
    print("\n" + text, flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "config": cfg, "threads": threads,
                                               "read_GBps": bw, "head": head, "rows": rows}, indent=2))
    return 0
