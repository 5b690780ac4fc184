"""Fused rotary + write_kv on cpu_amx (issues 20 and 22): batch-1 decode with the fused op and
with the two ops it replaces, in one process on one engine, interleaved.

"split" runs the model's ``rotary_write_kv`` as ``rotary`` then ``write_kv`` through the
dispatcher (what every layer ran before the fusion); "fused" is the backend's one C call.
Both ways: eager steps (``enforce_eager``: Python dispatch per op, where the fusion saves a
call a layer) and replayed CPU graphs (one C call a step: the saving is one program entry a
layer), the C calls a captured batch-1 step holds, and a bitwise check of greedy tokens and
logprobs. ``tiny`` (hidden 64, 22 layers) reads ~nothing a token: its step is overhead.

  python bench/fuse_cpu.py --shapes tiny,1.1b --threads 16 --json out.json
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))
from cpugraph import checkpoint, shape_main  # noqa: E402  (the same random checkpoints and driver)


def split_op(hal):
    """The model's rotary_write_kv as the two ops it replaces, through the dispatcher."""
    def rotary_write_kv(positions, q, k, v, cos_sin_cache, is_neox, kv_cache, slot_mapping, **scales):
        hal.rotary(positions, q, k, cos_sin_cache, is_neox)
        hal.write_kv(k, v, kv_cache, slot_mapping, **scales)

    return rotary_write_kv


def run_shape(shape: str, args, out: dict) -> None:
    import torch

    from halserve import LLM, SamplingParams

    row = out.setdefault(shape, {})
    path = checkpoint(shape, Path(args.work_dir), args.layers)
    llm = LLM(str(path), backend="cpu_amx", dtype="bfloat16", max_num_seqs=1, max_model_len=args.max_model_len,
              enable_prefix_caching=False)
    eng, hal = llm.engine, llm.engine.hal
    runner, layers = eng.runner, eng.model_config.num_layers
    # a capture's state: its graphs and the static buffers and metadata they were recorded on
    state = ("graphs", "_static", "_decode_meta", "tail_graphs", "_tail", "_tail_meta")
    graphs = {"fused": {k: getattr(runner, k) for k in state}}
    for k in state:  # a second capture must not write into the first one's buffers
        setattr(runner, k, {})
    hal.rotary_write_kv = split_op(hal)  # an instance attribute: the model's call goes to it
    runner.capture_decode_graphs(1, args.max_model_len)
    graphs["split"] = {k: getattr(runner, k) for k in state}
    del hal.rotary_write_kv
    for way, gs in graphs.items():
        g1 = gs["graphs"].get(1)
        row[f"c_calls_{way}"] = None if g1 is None else g1.num_c
    if row["c_calls_fused"] is not None and row["c_calls_split"] is not None:
        row["c_calls_saved_per_layer"] = (row["c_calls_split"] - row["c_calls_fused"]) / layers
    print(f"{shape}: batch-1 graph C calls split {row['c_calls_split']}, fused {row['c_calls_fused']} "
          f"({layers} layers)", flush=True)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, eng.model_config.vocab_size, (args.input_len,), generator=g).tolist()

    def decode(way: str, graph: bool, n: int, logprobs=None):
        for k, val in graphs[way].items():
            setattr(runner, k, val)
        if not graph:
            runner.graphs, runner.tail_graphs = {}, {}
        if way == "split":
            hal.rotary_write_kv = split_op(hal)
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)
        eng.add_request(f"r{time.perf_counter_ns()}", prompt, sp)
        times, last, outs = [], None, []
        try:
            while eng.has_unfinished():
                t0 = time.perf_counter()
                outs += eng.step()
                if last is not None:  # the steps after the prefill's
                    times.append(time.perf_counter() - t0)
                last = t0
        finally:
            hal.__dict__.pop("rotary_write_kv", None)
        return times, outs

    modes = [(w, gr) for gr in (False, True) for w in ("split", "fused")]
    for w, gr in modes:
        decode(w, gr, 3)
    acc = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            times, _ = decode(*m, args.tokens)
            acc[m].append(sum(times) / len(times))
    for (w, gr), v in acc.items():
        row[f"step_ms_{'graph' if gr else 'eager'}_{w}"] = 1e3 * statistics.median(v)
    for kind in ("eager", "graph"):
        s, f = row[f"step_ms_{kind}_split"], row[f"step_ms_{kind}_fused"]
        row[f"{kind}_split_over_fused"] = s / f
        row[f"{kind}_saved_us_per_layer"] = (s - f) * 1e3 / layers
    results = {}
    for w in ("split", "fused"):
        _, o = decode(w, False, 8, logprobs=5)
        results[w] = [x for x in o if x.finished][0].outputs[0]
    row["tokens_equal"] = results["split"].token_ids == results["fused"].token_ids
    row["logprobs_equal"] = results["split"].logprobs == results["fused"].logprobs
    print(f"{shape}: batch-1 step eager split {row['step_ms_eager_split']:.3f} ms, fused "
          f"{row['step_ms_eager_fused']:.3f} ms (x{row['eager_split_over_fused']:.3f}, "
          f"{row['eager_saved_us_per_layer']:.1f} us a layer) | graph split {row['step_ms_graph_split']:.3f} ms, "
          f"fused {row['step_ms_graph_fused']:.3f} ms (x{row['graph_split_over_fused']:.3f}) | tokens equal "
          f"{row['tokens_equal']}, logprobs equal {row['logprobs_equal']}", flush=True)
    del llm, eng, hal, runner, graphs


def main() -> int:
    return shape_main(__doc__.splitlines()[0], run_shape, tokens=16, repeats=5, max_model_len=512)


if __name__ == "__main__":
    raise SystemExit(main())
