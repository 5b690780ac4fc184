"""The engine's host time per decode step at batch 1-64 (issue 19, issue 22): the model's
forward and lm head are replaced by a table lookup (a step's logits a function of its input
tokens), so what is left of a step is host work: scheduling, staging the inputs, the replay
call, the draw, token append, detokenizing, outputs.

Backends: ``native`` (eager: ``_prepare``) and the test double whose 'graph' replays the
captured step on its static buffers (``test_replay_graphs``: ``_stage_decode``, the path
cpu_amx and the GPU backends take). Reports the process CPU time a decode step (robust on a
shared box), the best of --reps runs. ``--profile`` prints a cProfile of one run instead.
To compare two trees in one sitting, run it with each first on PYTHONPATH, alternately:

    PYTHONPATH=/path/to/old/checkout:. nice -n 10 python bench/engine_host.py
    PYTHONPATH=. nice -n 10 python bench/engine_host.py
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


class _Timed:
    __slots__ = ("replay",)

    def __init__(self, replay):
        self.replay = replay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,16,32,64")
    p.add_argument("--backend", default="test_replay_graphs,native")
    p.add_argument("--vocab", type=int, default=32000, help="logits width (TinyLlama's: 32000; the tokens drawn stay in the tiny tokenizer's)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--output-kind", default="delta", help="delta (the server's, halserve bench cpu's), "
                   "cumulative, final (LLM.generate's)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sort", default="tottime", help="cProfile order (--profile)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    import halserve
    from halserve import LLM, SamplingParams, hal
    from tests.engine.test_graphs import ReplayGraphBackend
    from tests.helpers.checkpoints import make_checkpoint

    hal.register(ReplayGraphBackend)
    # CPU seconds in the stubbed model, the double's replay copy and the HAL's draw (its argmax
    # over the vocabulary): device work on a real device, taken off the host time reported
    device = [0.0, 0]

    def timed(fn):
        def run(*a, **k):
            device[1] += 1
            t = time.process_time() if device[1] == 1 else 0.0
            try:
                return fn(*a, **k)
            finally:
                device[1] -= 1
                if device[1] == 0:
                    device[0] += time.process_time() - t
        return run

    ckpt = make_checkpoint("llama", Path(tempfile.mkdtemp(prefix="engine_host_")), 0, num_hidden_layers=1)
    batches = [int(b) for b in args.batch.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (args.input_len,), generator=g).tolist() for _ in range(max(batches))]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, logprobs=args.logprobs)
    print(f"halserve from {Path(halserve.__file__).parent}; vocab {args.vocab}, {args.input_len} in, "
          f"{args.output_len} out", flush=True)
    for backend in args.backend.split(","):
        llm = LLM(str(ckpt), backend=backend, dtype="float32", max_num_seqs=max(batches),
                  max_model_len=args.input_len + args.output_len + 16, enable_prefix_caching=False)
        table = torch.randn(4096, args.vocab, generator=torch.Generator().manual_seed(1))
        # the logits are --vocab wide; the tokens drawn stay in the tokenizer's vocabulary
        table[:, llm.engine.model_config.vocab_size:] = -1e4
        # hidden = the input ids; logits = a row of the table a token (the lm head's output dtype)
        llm.engine.model.forward = timed(lambda ids, pos, caches, meta: ids)
        llm.engine.model.compute_logits = timed(lambda h: table.index_select(0, h % 4096))
        llm.engine.hal.sample = timed(llm.engine.hal.sample)
        for graphs in (llm.engine.runner.graphs, llm.engine.runner.tail_graphs):
            for k, graph in graphs.items():  # a replay (the double's: its copy into its output buffer)
                graphs[k] = _Timed(timed(graph.replay))
        eng = llm.engine

        def run(b):
            for i in range(b):
                eng.add_request(str(i), prompts[i], params, output_kind=args.output_kind)
            while eng.has_unfinished():
                eng.step()

        for b in batches:
            run(b)
            if args.profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
                run(b)
                prof.disable()
                print(f"== {backend} batch {b}")
                pstats.Stats(prof).sort_stats(args.sort).print_stats(40)
                prof.dump_stats(f"/tmp/engine_host_{backend}_{b}.prof")
                continue
            best = float("inf")
            for _ in range(args.reps):
                s0, d0 = llm.engine.steps_run, device[0]
                c = time.process_time()
                run(b)
                c = time.process_time() - c
                steps = llm.engine.steps_run - s0
                if (c - (device[0] - d0)) / steps < best:
                    best, whole = (c - (device[0] - d0)) / steps, c / steps
            print(f"{backend} batch {b}: host {1e6 * best:.0f} us a step (CPU less the stubbed model and "
                  f"the draw; {1e6 * whole:.0f} us with them)", flush=True)


if __name__ == "__main__":
    main()
