"""The sampler reads a captured step's logits in the graph's own output buffer (no copy a
step): every reader of them is queued before the next replay rewrites it. Checked with a
graph double whose every replay first overwrites the outputs of all captured steps (as a
replay rewrites its buffer, and as graphs sharing a memory pool reuse each other's memory):
a reader late by one replay would see garbage, and the tokens, logprobs and text would
differ from those of a graph double whose every replay returns fresh tensors (the same
buckets and padding rows, so the same bits: the eager engine's batches differ in shape, and
a matmul's rounding with them)."""
from __future__ import annotations

import pytest
import torch

from halserve import LLM, SamplingParams, hal
from halserve.hal.interface import Capabilities
from tests.engine.test_graphs import ReplayGraph, ReplayGraphBackend


class _FreshGraph:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()  # new output tensors every time: nothing a late reader could lose


class _PoisonGraph(ReplayGraph):
    outputs: list = []  # every captured step's output buffers (one pool)

    def replay(self):
        for t in _PoisonGraph.outputs:  # what this replay may overwrite before it writes
            t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
        first = self.output is None
        out = super().replay()
        if first:
            _PoisonGraph.outputs.extend(self.output)
        return out


class PoisonGraphs(ReplayGraphBackend):
    name = "test_poison_graphs"
    async_device = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(graphs=True, async_device=self.async_device)

    def capture_graph(self, fn, *args):
        return _PoisonGraph(lambda: fn(*args))


class FreshGraphs(PoisonGraphs):
    name = "test_fresh_graphs"

    def capture_graph(self, fn, *args):
        return _FreshGraph(lambda: fn(*args))


class PoisonGraphsAsync(PoisonGraphs):
    """The same, with async scheduling: step n + 1 replays before step n's tokens are read."""
    name = "test_poison_graphs_async"
    async_device = True


def _params():
    return [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=14, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, seed=3, max_tokens=5, ignore_eos=True),
        # logits processors edit the sampled logits in place while logprobs are asked for (the
        # reference runs the same runner code: this checks the graph read, not which logits
        # logprobs come from)
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5,
                       frequency_penalty=0.5, logprobs=1),
        SamplingParams(temperature=0.7, seed=11, max_tokens=16, min_tokens=10, n=2),
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
    ]


def _run(llm, prompts):
    outs = llm.generate(prompts, _params())
    return [[(c.token_ids, c.text, c.cumulative_logprob,
              [{k: (v.logprob, v.rank) for k, v in d.items()} for d in c.logprobs] if c.logprobs else None)
             for c in o.outputs] for o in outs]


@pytest.mark.parametrize("backend", ["test_poison_graphs", "test_poison_graphs_async"])
def test_graph_logits_read_in_place_match_fresh_outputs(checkpoint, backend):
    hal.register(PoisonGraphs)
    hal.register(PoisonGraphsAsync)
    hal.register(FreshGraphs)
    path = checkpoint("llama")
    prompts = [[5, 17, 42], list(range(10, 47)), [9] * 20, [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1], [4] * 6]
    ref = _run(LLM(str(path), dtype="float32", max_num_seqs=16, backend="test_fresh_graphs"), prompts)
    g = LLM(str(path), dtype="float32", max_num_seqs=16, backend=backend)
    assert g.engine.runner.graphs and g.engine.async_scheduling == (backend.endswith("async"))
    _PoisonGraph.outputs = []
    with torch.inference_mode():
        got = _run(g, prompts)
    assert got == ref
    assert _PoisonGraph.outputs  # the decode steps did replay (rows finishing change the bucket)
