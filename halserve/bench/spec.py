"""``halserve bench spec``: speculative decoding's speed-up over plain decode, end to end
through ``LLM.generate``, in one process.

Curve: a callable proposer drafts the target's own greedy continuation, each draft token
right with probability alpha and the draft cut at the first wrong one, for every alpha in
``--alphas`` and k in ``--ks``, at every batch size in ``--batches``. The continuation is
the one the speculative engine's verify steps compute (an untimed run at each k offering
the plain run's output, all of it): in bf16 plain decode's can differ from it (other GEMM
and attention shapes), and an oracle drafting a drifted continuation is no longer right
with probability alpha. Rows whose two continuations differ are counted (drifted_rows).
Every figure is a ratio to the plain run in the same process (the peer) and to the ideal
(tokens a verify step emits: the speed-up if verifying k+1 tokens cost one decode step).
``--batch-invariant 16`` also runs the batch-16 curve with both engines in batch-invariant
mode (a size in both lists runs both ways).

Why the oracle's continuation comes from the verify path, and what can still drift: in bf16
a row's numbers depend on the shapes of the step that computes them (cuBLAS picks its kernel
by the number of rows; attention's split count follows the grid). Plain decode (1 row a
sequence) and a verify step (k+1 rows a sequence) round differently, so plain decode's greedy
continuation is not what the verify steps compute: an oracle drafting it is right with
probability alpha only until the first place the two differ, and then almost never (the
acceptance collapses, e.g. 0.09 at k=8 where alpha was 0.8). A verify step's shape is its
graph bucket: b rows of k+1 token slots whatever the drafts' lengths
(engine/spec/verify_graph.py), so at a fixed batch every verify step computes the same
numbers and the untimed run's continuation is what the timed runs compute. (Until 2026-12-04
one sequence's verify step padded its k+1 tokens to a power of two by draft length: at k=8 a
full draft ran 16 rows and a short one 2-8, the timed runs' greedy path moved with alpha:
"rows differ".) What is left: a step where some row has no draft at all runs the decode graph,
and at batch > 1 the bucket shrinks as rows finish; a row whose timed greedy path still
differs from the untimed run's is counted (``mismatched_rows``, printed as "rows left the
oracle's path"): its acceptance after that point is not alpha's. ``drifted_rows``: rows whose
verify-path greedy differs from plain decode's (expected in bf16, harmless to the figures).
Greedy output equal to the plain run's (lossless) holds exactly in float32 and in
batch-invariant mode (tests/engine/test_spec_*.py).

n-gram: the demo model completing and editing Python from the standard library (prompt
lookup pays off where the output repeats the prompt), with its measured acceptance.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from halserve.bench.latency import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="random-weight model shape for the curve (default: the demo model)")
    p.add_argument("--model", default=None, help="a checkpoint directory for the curve instead")
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--workdir", default=None, help="where random checkpoints go")
    p.add_argument("--backend", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--alphas", default="0.3,0.6,0.8,0.95")
    p.add_argument("--ks", default="2,4,8")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--batch-invariant", default="", metavar="BATCHES",
                   help="batch sizes whose curve (also) runs in batch-invariant mode, plain and "
                        "speculative alike (e.g. 16); a size also in --batches runs both ways")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--no-curve", action="store_true", help="skip the acceptance-rate curve")
    p.add_argument("--no-ngram", action="store_true", help="skip the n-gram workload")
    p.add_argument("--ngram-k", type=int, default=4)
    p.add_argument("--ngram-tokens", type=int, default=128, help="tokens generated per n-gram prompt")
    p.add_argument("--json", default=None)


def _spec_counts(llm) -> tuple[int, int, int]:
    m = llm.get_metrics()  # no keys without speculation
    return (m.get("spec_decode_num_drafts", 0), m.get("spec_decode_num_draft_tokens", 0),
            m.get("spec_decode_num_accepted_tokens", 0))


class Timing(tuple):
    """``_timed``'s answer: (seconds, outputs, (verify steps, drafted, accepted)), and
    ``decode_s`` (from the last row's first token to the end: the decode phase alone, no
    prefill), ``steps`` and ``host_us`` (per engine step: its wall time less the time the
    host sat blocked on the device for the step's tokens; overlapped with the device or not)."""

    decode_s: float
    steps: int
    host_us: float
    preemptions: int


def _timed(llm, prompts, params) -> Timing:
    import torch

    # warm-up at this batch's shapes (all of its prompts: a batch's prefill compiles kernels a
    # single prompt's does not, and a cold plain run made batch-16 speed-ups look > ideal)
    llm.generate(prompts, params.clone(max_tokens=4))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    clock = _step_clock(llm.engine)
    before = _spec_counts(llm)
    steps0, wall0, wait0 = llm.engine.steps_run, clock[0], llm.engine.runner.wait_seconds
    pre0 = llm.engine.scheduler.num_preemptions
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    t = time.perf_counter() - t
    counts = tuple(x - y for x, y in zip(_spec_counts(llm), before))
    out = Timing((t, [o.outputs[0].token_ids for o in outs], counts))
    out.decode_s = max(o.metrics.finished_time for o in outs) - max(o.metrics.first_token_time for o in outs)
    out.steps = llm.engine.steps_run - steps0
    out.preemptions = llm.engine.scheduler.num_preemptions - pre0
    out.host_us = 1e6 * ((clock[0] - wall0) - (llm.engine.runner.wait_seconds - wait0)) / max(out.steps, 1)
    return out


def _step_clock(engine) -> list:
    """[seconds inside ``engine.step``], kept by a wrapper installed once."""
    clock = getattr(engine, "_bench_clock", None)
    if clock is None:
        clock = engine._bench_clock = [0.0]
        step = engine.step

        def timed_step():
            t = time.perf_counter()
            try:
                return step()
            finally:
                clock[0] += time.perf_counter() - t

        engine.step = timed_step
    return clock


class AlphaOracle:
    """Drafts the reference continuation; each token right with probability ``alpha``, the
    draft ending at the first wrong one. A coin an output position, drawn once a prompt
    (seeded by the prompt: every run drafts the same): the draft token at position p is
    right iff coin[p] < alpha. Each position is drafted at most once before the target's own
    token lands there, so the draws are independent. Cheap a call (a dict lookup and k
    compares): its own cost is counted in the speculative run's time, as a real proposer's
    would be; it had seeded a Mersenne Twister a call."""

    def __init__(self, refs: dict, input_len: int, vocab: int):
        self.refs, self.input_len, self.vocab = refs, input_len, vocab
        self.alpha, self.k = 1.0, 0
        self._coins: dict = {}
        self.__name__ = "alpha_oracle"

    def __call__(self, token_ids: list[int]) -> list[int]:
        key = tuple(token_ids[:self.input_len])
        ref = self.refs.get(key)
        if ref is None:
            return []
        coins = self._coins.get(key)
        if coins is None or len(coins) < len(ref):
            rng = random.Random(hash(key[:8]))
            coins = self._coins[key] = [rng.random() for _ in range(len(ref))]
        pos = len(token_ids) - self.input_len
        out = []
        for t, c in zip(ref[pos:pos + self.k], coins[pos:pos + self.k]):
            if c < self.alpha:
                out.append(t)
            else:
                out.append((t + 1) % self.vocab)
                break
        return out


def curve(args, rows: list) -> None:
    if args.model:
        model = Path(args.model)
    elif args.preset:
        from halserve.bench.latency import ensure_checkpoint

        model = ensure_checkpoint(args)
    else:
        from halserve.server.cli import demo_model_path

        model = demo_model_path()
    alphas = [float(a) for a in args.alphas.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",") if b]
    invariant = [int(b) for b in args.batch_invariant.split(",") if b]
    for inv, group in ((False, batches), (True, invariant)):
        if group:
            _curve_group(args, model, group, max(group), alphas, ks, inv, rows)


def _curve_group(args, model: Path, batches: list[int], bmax: int, alphas, ks, invariant: bool, rows: list):
    """The curve for ``batches``, plain and speculative engines both in batch-invariant mode
    or both not."""
    import torch

    from halserve import LLM, SamplingParams
    from halserve.bench.decode import copy_bandwidth_gbs
    from halserve.bench.latency import weight_bytes_per_token

    n = args.output_len
    common = dict(backend=args.backend, dtype=args.dtype, max_num_seqs=bmax, batch_invariant=invariant,
                  max_model_len=args.input_len + n + max(ks) + 16, enable_prefix_caching=False)
    mode = " (batch-invariant)" if invariant else ""
    llm = LLM(str(model), **common)
    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.input_len,), generator=g).tolist() for _ in range(bmax)]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    wbytes = weight_bytes_per_token(llm.engine.model)
    bw = copy_bandwidth_gbs(llm.engine.runner.device)
    base, refs, plain_dev, plain_run = {}, {}, {}, {}
    for b in batches:
        plain_run[b] = run = _timed(llm, prompts[:b], params)
        t, outs, _ = run
        base[b] = t
        plain_dev[b] = _replay_ms(llm.engine.runner.graphs, b)
        refs[b] = outs
        roof = wbytes / (bw * 1e9)  # seconds a decode step must take to read the weights once
        print(f"[spec] plain decode batch {b}{mode}: {b * n / t:.1f} tok/s, {t / n * 1e3:.2f} ms/step = "
              f"{100 * roof / (t / n):.0f}% of the {bw:.0f} GB/s copy-bandwidth roofline; decode alone "
              f"{1e3 * run.decode_s / max(n - 1, 1):.2f} ms/step; host {run.host_us:.0f} us/step "
              f"(wall less the wait for the device; async: {llm.engine.async_scheduling})", flush=True)
    name = f"{llm.engine.hal.name} on {llm.engine.runner.device}"
    del llm
    gc.collect()
    oracle = AlphaOracle({}, args.input_len, vocab)
    llm = LLM(str(model), speculative_config={"method": "callable", "proposer": oracle,
                                              "num_speculative_tokens": max(ks)}, **common)
    verifiers = _verify_graphs_by_k(llm, ks, bmax, common["max_model_len"])
    graphed = _count_graph_steps(llm, verifiers.values())
    for b in batches:
        for k in ks:
            if verifiers:  # the verify graphs of an engine configured with this k
                llm.engine.runner.verify = verifiers[k]
            # the oracle's continuation: what this engine's verify steps compute (an untimed
            # run drafting the plain output, every token offered); in bf16 it can differ from
            # plain decode's, whose GEMM and attention shapes differ (counted: drifted_rows)
            oracle.refs = {tuple(p): r for p, r in zip(prompts[:b], refs[b])}
            oracle.alpha, oracle.k = 1.0, k
            _, own, _ = _timed(llm, prompts[:b], params)
            oracle.refs = {tuple(p): r for p, r in zip(prompts[:b], own)}
            drifted = sum(o != r for o, r in zip(own, refs[b]))
            # the device time of one verify step alone (its graph replayed), beside the wall
            # time a step takes end to end: what is left is the host's share (a spec step
            # runs synchronously, its host work not overlapped with the device)
            verify_dev = _replay_ms(llm.engine.runner.verify.graphs if llm.engine.runner.verify else {}, b)
            if verify_dev is not None and plain_dev[b] is not None:
                print(f"[spec] batch {b:2d}{mode} k={k}: verify graph replay {verify_dev:.2f} ms = "
                      f"{verify_dev / plain_dev[b]:.2f}x a plain decode replay ({plain_dev[b]:.2f} ms; "
                      f"plain wall {1e3 * base[b] / n:.2f} ms/step)", flush=True)
            for a in alphas:
                oracle.alpha = a
                graphed[:] = [0, 0]
                h0, s0 = llm.engine.host_seconds, llm.engine.steps_run
                run = _timed(llm, prompts[:b], params)
                t, outs, (steps, drafted, accepted) = run
                mismatched = sum(o != r for o, r in zip(outs, own))
                emitted = (accepted + steps) / max(steps, 1)
                row = dict(model=model.name, backend=name, batch=b, k=k, alpha=a, batch_invariant=invariant,
                           plain_s=base[b], spec_s=t, speedup=base[b] / t, acceptance=accepted / max(drafted, 1),
                           tokens_per_verify=emitted, pct_of_ideal=100 * base[b] / t / emitted,
                           mismatched_rows=mismatched, drifted_rows=drifted,
                           verify_steps_in_graphs=graphed[0], steps=graphed[1],
                           # the engine's own timer: scheduling and outputs, not the runner or proposer
                           engine_host_ms_per_step=1e3 * (llm.engine.host_seconds - h0)
                           / max(llm.engine.steps_run - s0, 1),
                           wall_ms_per_step=1e3 * t / max(graphed[1], 1), verify_replay_ms=verify_dev,
                           plain_replay_ms=plain_dev[b], plain_wall_ms_per_step=1e3 * base[b] / n,
                           # the decode phase alone (after every row's first token: no prefill)
                           plain_decode_s=plain_run[b].decode_s, spec_decode_s=run.decode_s,
                           decode_speedup=plain_run[b].decode_s / max(run.decode_s, 1e-9),
                           # per engine step, wall less the wait for the device's tokens
                           plain_host_us_per_step=plain_run[b].host_us, spec_host_us_per_step=run.host_us)
                rows.append(row)
                print(f"[spec] batch {b:2d}{mode} k={k} alpha={a:.2f}: {row['speedup']:.2f}x plain "
                      f"(acceptance {row['acceptance']:.2f}, {emitted:.2f} tokens/verify -> "
                      f"{row['pct_of_ideal']:.0f}% of ideal; {graphed[0]}/{graphed[1]} steps in verify graphs); "
                      f"decode alone {row['decode_speedup']:.2f}x; host {run.host_us:.0f} us/step "
                      f"(plain {plain_run[b].host_us:.0f})"
                      + (f"; {mismatched}/{b} rows left the oracle's path (their later acceptance is not "
                         f"alpha's)" if mismatched else "")
                      + (f"; {drifted}/{b} rows' verify-path greedy differs from plain decode's (bf16)"
                         if drifted else ""), flush=True)
    del llm
    gc.collect()


def _replay_ms(graphs: dict, b: int) -> "float | None":
    """Milliseconds one replay of the graph that serves ``b`` rows takes on the device
    (CUDA events over 20 replays of its last inputs), None without CUDA graphs."""
    import torch

    fits = [x for x in graphs if x >= b]
    if not fits or not torch.cuda.is_available():
        return None
    g = graphs[min(fits)]
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 20


def _verify_graphs_by_k(llm, ks: list[int], max_num_seqs: int, max_model_len: int) -> dict:
    """k -> the verify graphs an engine with ``num_speculative_tokens=k`` captures (b rows of
    k + 1 slots), so that one engine (configured with the largest k, its scheduler reserving
    room for it) measures every k: the oracle drafts at most k, and the step is the one a
    k-engine runs. Empty where the backend captures no graphs."""
    from halserve.engine.spec.verify_graph import VerifyGraphs

    runner = llm.engine.runner
    if runner.verify is None:
        return {}
    out = {runner.verify.width - 1: runner.verify}
    for k in ks:
        if k not in out:
            out[k] = VerifyGraphs(runner, k)
            out[k].capture(max_num_seqs, -(-max_model_len // runner.block_size), max_model_len,
                           runner.hidden_sink is not None)
    return out


def _count_graph_steps(llm, verifiers) -> list[int]:
    """[steps that replayed a verify graph, steps], counted from the list's last reset."""
    runner, counts = llm.engine.runner, [0, 0]
    execute = runner.execute

    def counted(so):
        counts[1] += 1
        return execute(so)

    runner.execute = counted
    for verify in verifiers:
        def staged(so, extra=(), stage=verify.stage):
            out = stage(so, extra)
            counts[0] += out is not None
            return out

        verify.stage = staged
    return counts


def _python_prompts(count: int) -> list[str]:
    """Completing and editing real Python: standard-library sources cut at a function, and
    a function followed by a request to repeat it renamed."""
    import inspect
    import json as json_mod
    import textwrap

    srcs = [inspect.getsource(m) for m in (textwrap, json_mod.decoder, json_mod.encoder)]
    out = []
    for i in range(count):
        src = srcs[i % len(srcs)]
        defs = [j for j in range(len(src)) if src.startswith("\ndef ", j)]
        cut = defs[(i // len(srcs)) % len(defs)] if defs else len(src) // 2
        body = src[max(0, cut - 1200):cut + 400]
        if i % 2:  # editing: the same code again with one name changed
            name = body.split("def ", 1)[-1].split("(", 1)[0] if "def " in body else "x"
            out.append(body + f"\n\n# the same code with {name} renamed to {name}_v2:\n" + body[:300])
        else:
            out.append(body)
    return out


def ngram(args, rows: list) -> None:
    from halserve import LLM, SamplingParams
    from halserve.server.cli import demo_model_path

    model = demo_model_path()
    prompts = _python_prompts(8)
    params = SamplingParams(temperature=0, max_tokens=args.ngram_tokens, ignore_eos=True)
    common = dict(backend=args.backend, dtype=args.dtype, max_num_seqs=len(prompts))
    llm = LLM(str(model), **common)
    base = {b: _timed(llm, prompts[:b], params) for b in (1, len(prompts))}
    del llm
    gc.collect()
    llm = LLM(str(model), speculative_config={"method": "ngram", "num_speculative_tokens": args.ngram_k,
                                              "prompt_lookup_max": 4, "prompt_lookup_min": 2}, **common)
    for b in (1, len(prompts)):
        run = _timed(llm, prompts[:b], params)
        t, outs, (steps, drafted, accepted) = run
        row = dict(workload="ngram python (demo model)", batch=b, k=args.ngram_k, plain_s=base[b][0], spec_s=t,
                   speedup=base[b][0] / t, acceptance=accepted / max(drafted, 1),
                   tokens_per_verify=(accepted + steps) / max(steps, 1),
                   mismatched_rows=sum(o != r for o, r in zip(outs, base[b][1])),
                   decode_speedup=base[b].decode_s / max(run.decode_s, 1e-9),
                   plain_host_us_per_step=base[b].host_us, spec_host_us_per_step=run.host_us,
                   plain_steps=base[b].steps, spec_steps=run.steps, plain_decode_s=base[b].decode_s,
                   spec_decode_s=run.decode_s, plain_preemptions=base[b].preemptions,
                   spec_preemptions=run.preemptions)
        rows.append(row)
        print(f"[spec] n-gram on Python, batch {b}: {row['speedup']:.2f}x plain (decode alone "
              f"{row['decode_speedup']:.2f}x), acceptance {row['acceptance']:.2f}, "
              f"{row['tokens_per_verify']:.2f} tokens/verify; host {run.host_us:.0f} us/step "
              f"(plain {base[b].host_us:.0f}); steps {run.steps} (plain {base[b].steps}), decode "
              f"{run.decode_s:.3f} s (plain {base[b].decode_s:.3f} s), "
              f"preemptions {run.preemptions} (plain {base[b].preemptions})"
              + (f"; {row['mismatched_rows']} rows differ" if row["mismatched_rows"] else ""),
              flush=True)


def main(args: argparse.Namespace) -> int:
    import torch

    rows: list = []
    print(f"[spec] {time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}, "
          f"{torch.get_num_threads()} threads", flush=True)
    if not args.no_curve:
        curve(args, rows)
    if not args.no_ngram:
        ngram(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
