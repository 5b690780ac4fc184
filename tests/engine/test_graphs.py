"""Decode-graph plumbing of the runner (buckets, static buffers, padding rows with slot -1),
checked on the CPU with a backend whose 'graph' replays the captured step function."""
from __future__ import annotations

from halserve import LLM, SamplingParams, hal
from halserve.hal.interface import Capabilities, ProbeResult
from halserve.hal.native import NativeBackend


class ReplayGraph:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()  # reads the static buffers as they are now, like a real graph


class ReplayGraphBackend(NativeBackend):
    name = "test_replay_graphs"
    captured = 0

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(0, "test backend: only when forced")

    @classmethod
    def interpreter_ok(cls) -> bool:
        return True

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(graphs=True)

    def capture_graph(self, fn, *args):
        ReplayGraphBackend.captured += 1
        return ReplayGraph(lambda: fn(*args))


def test_graph_decode_matches_eager(checkpoint):
    hal.register(ReplayGraphBackend)
    path = checkpoint("qwen3")
    prompts = [[5, 17, 42], list(range(10, 47)), [9] * 20, [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1]]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    eager = LLM(str(path), dtype="float32", max_num_seqs=16)
    ref = [o.outputs[0].token_ids for o in eager.generate(prompts, sp)]
    g = LLM(str(path), dtype="float32", max_num_seqs=16, backend="test_replay_graphs")
    assert sorted(g.engine.runner.graphs) == [1, 2, 4, 8, 16]
    assert ReplayGraphBackend.captured == 5
    # 5 running rows replay the 8-row graph with 3 padding rows; then fewer as they finish
    assert [o.outputs[0].token_ids for o in g.generate(prompts, sp)] == ref
    assert [o.outputs[0].token_ids for o in g.generate(prompts[:1], sp)] == ref[:1]
    off = LLM(str(path), dtype="float32", max_num_seqs=16, backend="test_replay_graphs", enforce_eager=True)
    assert not off.engine.runner.graphs
