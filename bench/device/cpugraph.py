"""cpu_amx decode graphs (issue 22): batch-1 decode through the engine with and without the
captured step, in one process on one engine (the eager rows hide its graphs), interleaved.

For each shape: load time and capture time; decode tok/s and ms a step both ways (median of
--repeats interleaved pairs); the forward alone (replay vs the step function called eagerly);
the read roofline (a multi-threaded sum) and the weights a token reads; and a bitwise check of
the greedy tokens and their logprobs both ways. ``tiny`` (hidden 64, 22 layers) reads ~nothing
per token: its step time is the per-step overhead.

  python bench/device/cpugraph.py --shapes tiny,1.1b --threads 16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TINY = dict(hidden_size=64, num_hidden_layers=22, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=32000, max_position_embeddings=4096)


def checkpoint(shape: str, work: Path, layers: int = 0) -> Path:
    from halserve.bench.cpu import SHAPES
    from halserve.bench.cpu_ckpt import write_random

    if shape == "tiny":
        return write_random(work / "cpugraph-tiny-bf16", dict(TINY))
    cfg = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    # where `halserve bench cpu` writes it: one written there is reused
    return write_random(work / f"cpu-{shape}-L{cfg['num_hidden_layers']}-V{cfg['vocab_size']}-random-bf16", dict(cfg))


def run_shape(shape: str, args, out: dict) -> None:
    import torch

    from halserve import LLM, SamplingParams
    from halserve.bench.cpu import read_bandwidth_gbs
    from halserve.bench.latency import weight_bytes_per_token
    from halserve.engine.runner import ModelRunner

    row = out.setdefault(shape, {})
    path = checkpoint(shape, Path(args.work_dir), args.layers)
    cap = ModelRunner.capture_decode_graphs
    timing = {}

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return cap(self, *a, **k)
        finally:
            timing["capture_s"] = time.perf_counter() - t

    ModelRunner.capture_decode_graphs = timed
    t = time.perf_counter()
    try:
        llm = LLM(str(path), backend="cpu_amx", dtype="bfloat16", max_num_seqs=args.max_num_seqs,
                  max_model_len=args.max_model_len, enable_prefix_caching=False)
    finally:
        ModelRunner.capture_decode_graphs = cap
    eng = llm.engine
    runner = eng.runner
    row.update(load_s=time.perf_counter() - t, capture_s=timing.get("capture_s"), graphs=sorted(runner.graphs),
               refusal=eng.hal.graph_refusal, describe=eng.hal.describe())
    g1 = runner.graphs.get(1)
    if g1 is not None:
        row.update(c_calls=g1.num_c, torch_ops=g1.num_torch, replay_steps=len(g1.steps))
    print(f"{shape}: loaded in {row['load_s']:.1f} s, capture {row['capture_s'] or 0:.2f} s, graphs {row['graphs']}"
          f", batch-1 step: {row.get('c_calls')} C calls + {row.get('torch_ops')} torch ops in "
          f"{row.get('replay_steps')} replay steps", flush=True)
    graphs = dict(runner.graphs)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, eng.model_config.vocab_size, (args.input_len,), generator=g).tolist()

    def decode(on: bool, n: int, logprobs=None):
        runner.graphs = graphs if on else {}
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)
        eng.add_request(f"r{time.perf_counter_ns()}", prompt, sp)
        times, last, outs = [], None, []
        while eng.has_unfinished():
            t0 = time.perf_counter()
            outs += eng.step()
            if last is not None:  # the steps after the prefill's
                times.append(time.perf_counter() - t0)
            last = t0
        runner.graphs = graphs
        return times, outs

    decode(True, 4)
    decode(False, 4)
    on_s, off_s = [], []
    for _ in range(args.repeats):
        for on, acc in ((True, on_s), (False, off_s)):
            times, _ = decode(on, args.tokens)
            acc.append(sum(times) / len(times))  # a step's mean: the rate the engine decodes at
    row["step_ms_graph"] = 1e3 * statistics.median(on_s)
    row["step_ms_eager"] = 1e3 * statistics.median(off_s)
    row["tok_s_graph"] = 1e3 / row["step_ms_graph"]
    row["tok_s_eager"] = 1e3 / row["step_ms_eager"]
    row["saved_ms_per_step"] = row["step_ms_eager"] - row["step_ms_graph"]
    # bitwise: the same greedy request both ways, tokens and top-5 logprobs
    _, a = decode(True, 12, logprobs=5)
    _, b = decode(False, 12, logprobs=5)
    fin = [o for o in a if o.finished][0].outputs[0], [o for o in b if o.finished][0].outputs[0]
    row["tokens_equal"] = fin[0].token_ids == fin[1].token_ids
    row["logprobs_equal"] = fin[0].logprobs == fin[1].logprobs
    if g1 is not None:  # the forward alone: replay vs the captured step function run eagerly
        meta = runner._decode_meta[1]
        st = runner._static

        def fwd():
            return runner.model.compute_logits(runner.model.forward(st["ids"][:1], st["pos"][:1], runner.kv_caches,
                                                                    meta))

        fr, fe = [], []
        with torch.inference_mode():
            for _ in range(args.repeats):  # runs of 10 each way, interleaved
                for f, acc in ((g1.replay, fr), (fwd, fe)):
                    for _ in range(10):
                        t0 = time.perf_counter()
                        f()
                        acc.append(time.perf_counter() - t0)
        row["forward_ms_replay"] = 1e3 * statistics.median(fr)
        row["forward_ms_eager"] = 1e3 * statistics.median(fe)
        row["engine_ms_outside_forward"] = row["step_ms_graph"] - row["forward_ms_replay"]
    wb = weight_bytes_per_token(eng.model)
    bw = read_bandwidth_gbs()
    row.update(weight_bytes=wb, read_gbs=bw, roofline_tok_s=bw * 1e9 / wb)
    for k in ("graph", "eager"):
        row[f"roofline_frac_{k}"] = row[f"tok_s_{k}"] / row["roofline_tok_s"]
    print(f"{shape}: batch-1 decode graph {row['tok_s_graph']:.1f} tok/s ({row['step_ms_graph']:.2f} ms/step, "
          f"{row['roofline_frac_graph']:.0%} of the read roofline {row['roofline_tok_s']:.1f}) | eager "
          f"{row['tok_s_eager']:.1f} tok/s ({row['step_ms_eager']:.2f} ms/step, {row['roofline_frac_eager']:.0%})"
          f" | saved {row['saved_ms_per_step']:.2f} ms/step | forward alone: replay "
          f"{row.get('forward_ms_replay', float('nan')):.2f} ms, eager {row.get('forward_ms_eager', float('nan')):.2f}"
          f" ms (the engine's step outside it {row.get('engine_ms_outside_forward', float('nan')):.2f} ms)"
          f" | tokens equal {row['tokens_equal']}, logprobs equal {row['logprobs_equal']}", flush=True)
    del llm, eng, runner, graphs


def shape_main(description: str, run_shape, tokens: int, repeats: int, max_model_len: int, extra=None) -> int:
    """The per-shape driver this bench and bench/fuse_cpu.py share: common flags (``extra(p)``
    adds a script's own), threads, checkpoints' folder, ``run_shape(shape, args, out)`` per
    shape (one's failure keeps the others' figures), the JSON after each."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shapes", default="tiny,1.1b")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count (not tiny's)")
    p.add_argument("--max-model-len", type=int, default=max_model_len)
    p.add_argument("--work-dir", default="", help="checkpoints' folder (default: halserve bench cpu's)")
    p.add_argument("--json", default="")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.work_dir:
        from halserve.bench.startup import DEFAULT_CKPT_DIR

        args.work_dir = str(DEFAULT_CKPT_DIR.parent)
    out: dict = {"threads": torch.get_num_threads()}
    for shape in args.shapes.split(","):
        try:
            run_shape(shape, args, out)
        except Exception as e:  # one shape's failure keeps the others' figures
            out.setdefault(shape, {})["error"] = f"{type(e).__name__}: {e}"
            print(f"{shape}: FAILED {type(e).__name__}: {e}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


def main() -> int:
    # the graph's attention runs every key span up to --max-model-len (empty ones skipped): a real length
    return shape_main(__doc__.splitlines()[0], run_shape, tokens=32, repeats=3, max_model_len=4096,
                      extra=lambda p: p.add_argument("--max-num-seqs", type=int, default=4))


if __name__ == "__main__":
    raise SystemExit(main())
