"""Host time of a speculative step against a plain decode step, on any machine: the model's
forward is replaced by a table lookup (a step's hidden state a function of its input tokens,
so greedy decoding still follows a fixed chain and a proposer drafting that chain is right),
which leaves a step's time to its host work: scheduling, proposing, staging, the replay call,
lm head and sampling of a few rows, acceptance, outputs.

CPU: the test double whose 'graph' replays the captured step on its static buffers
(tests/engine/test_graphs.py), so verify steps take the captured path's staging. Reports the
process CPU time an engine step (robust on a shared box) and the wall time, each the minimum
of --reps runs. To compare two trees, run it with each first on PYTHONPATH, alternately:

    PYTHONPATH=/path/to/old/checkout:. python bench/spec_host.py --batch 1
    PYTHONPATH=. python bench/spec_host.py --batch 1
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


class Oracle:
    """Each draft token is the reference's with probability alpha (a coin an output position,
    drawn once), the draft ending at the first wrong one."""

    __name__ = "oracle"

    def __init__(self, refs: dict, input_len: int, alpha: float, k: int, vocab: int):
        self.refs, self.input_len, self.alpha, self.k, self.vocab = refs, input_len, alpha, k, vocab
        rng = random.Random(0)
        self.coins = [rng.random() for _ in range(4096)]

    def __call__(self, ids: list[int]) -> list[int]:
        ref = self.refs.get(tuple(ids[:self.input_len]))
        if ref is None:
            return []
        pos, out = len(ids) - self.input_len, []
        for t, c in zip(ref[pos:pos + self.k], self.coins[pos:pos + self.k]):
            out.append(t if c < self.alpha else (t + 1) % self.vocab)
            if c >= self.alpha:
                break
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--method", choices=("callable", "ngram"), default="callable")
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    import halserve
    from halserve import LLM, SamplingParams, hal
    from tests.engine.test_graphs import ReplayGraphBackend
    from tests.helpers.checkpoints import make_checkpoint

    hal.register(ReplayGraphBackend)
    ckpt = make_checkpoint("llama", Path(tempfile.mkdtemp(prefix="spec_host_")), 0, num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (args.input_len,), generator=g).tolist() for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    common = dict(backend="test_replay_graphs", dtype="float32", max_num_seqs=args.batch,
                  max_model_len=args.input_len + args.output_len + args.k + 16, enable_prefix_caching=False)

    def free_forward(llm):
        hidden = llm.engine.model_config.hf_config["hidden_size"]
        table = torch.randn(4096, hidden, generator=torch.Generator().manual_seed(1))
        llm.engine.model.forward = lambda ids, pos, caches, meta: table.index_select(0, ids % 4096)
        return llm

    plain = free_forward(LLM(str(ckpt), **common))
    refs = {tuple(q): o.outputs[0].token_ids for q, o in zip(prompts, plain.generate(prompts, params))}
    spec_cfg = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2} if args.method == "ngram" else \
        {"method": "callable", "num_speculative_tokens": args.k,
         "proposer": Oracle(refs, args.input_len, args.alpha, args.k, 512)}
    spec = free_forward(LLM(str(ckpt), speculative_config=spec_cfg, **common))
    print(f"halserve from {Path(halserve.__file__).parent}; batch {args.batch}, {args.method}"
          + (f" alpha {args.alpha}" if args.method == "callable" else "") + f", k {args.k}", flush=True)
    for name, llm in (("plain", plain), ("spec", spec)):
        llm.generate(prompts, params)
        wall = cpu = float("inf")
        for _ in range(args.reps):
            s0 = llm.engine.steps_run
            c, t = time.process_time(), time.perf_counter()
            outs = llm.generate(prompts, params)
            t, c = time.perf_counter() - t, time.process_time() - c
            steps = llm.engine.steps_run - s0
            wall, cpu = min(wall, t / steps), min(cpu, c / steps)
        same = all(o.outputs[0].token_ids == refs[tuple(q)] for q, o in zip(prompts, outs))
        print(f"{name}: {1e6 * cpu:.0f} us CPU a step, {1e6 * wall:.0f} us wall ({steps} steps for "
              f"{args.batch} x {args.output_len} tokens; output {'equals' if same else 'DIFFERS from'} plain)",
              flush=True)


if __name__ == "__main__":
    main()
