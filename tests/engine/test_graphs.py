"""Decode-graph plumbing of the runner (buckets, static buffers, padding rows with slot -1),
checked on the CPU with a backend whose 'graph' replays the captured step function."""
from __future__ import annotations

from halserve import LLM, SamplingParams, hal
from halserve.hal.interface import Capabilities, ProbeResult
from halserve.hal.native import NativeBackend


class ReplayGraph:
    replays = 0

    def __init__(self, fn):
        self.fn = fn
        self.output = None

    def replay(self):
        ReplayGraph.replays += 1
        out = self.fn()  # reads the static buffers as they are now, like a real graph
        # ... and, like one, returns the same output tensors every time, rewritten
        outs = out if isinstance(out, tuple) else (out,)
        if self.output is None:
            self.output = tuple(t.clone() for t in outs)
        for mine, t in zip(self.output, outs):
            mine.copy_(t)
        return self.output if isinstance(out, tuple) else self.output[0]


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
    eager = LLM(str(path), dtype="float32", max_num_seqs=16, backend="native")  # the double is native
    ref = [o.outputs[0].token_ids for o in eager.generate(prompts, sp)]
    before = ReplayGraphBackend.captured
    g = LLM(str(path), dtype="float32", max_num_seqs=16, backend="test_replay_graphs")
    assert sorted(g.engine.runner.graphs) == [1, 2, 4, 8, 16]
    assert sorted(g.engine.runner.tail_graphs) == [2, 4, 8, 16]
    assert ReplayGraphBackend.captured - before == 9 and g.engine.runner.verify is None  # none without speculation
    # 5 running rows replay the 8-row graph with 3 padding rows; then fewer as they finish
    assert [o.outputs[0].token_ids for o in g.generate(prompts, sp)] == ref
    assert [o.outputs[0].token_ids for o in g.generate(prompts[:1], sp)] == ref[:1]
    off = LLM(str(path), dtype="float32", max_num_seqs=16, backend="test_replay_graphs", enforce_eager=True)
    assert not off.engine.runner.graphs


def test_tail_graph_matches_eager(checkpoint, tmp_path):
    """A single sequence's short prefill chunk that samples (the tail after a prefix hit,
    here from the device cache and from the host offload tier) runs as a captured step."""
    hal.register(ReplayGraphBackend)
    path = checkpoint("llama")
    long = list(range(20, 120))  # 6 full blocks + 4 tokens
    prompts = [long, long + [7, 8, 9], long[:48] + [5] * 9, [3, 1, 4, 1, 5]]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    eager = LLM(str(path), dtype="float32", enforce_eager=True, backend="native")
    ref = [eager.generate([p], sp)[0].outputs[0].token_ids for p in prompts]
    g = LLM(str(path), dtype="float32", backend="test_replay_graphs", kv_offload_host_bytes=1 << 22)
    assert [g.generate([p], sp)[0].outputs[0].token_ids for p in prompts] == ref
    before = ReplayGraph.replays
    outs = [g.generate([p], sp)[0] for p in prompts[:3]]  # prefix hits: tails of 4, 7 and 9 tokens
    assert [o.outputs[0].token_ids for o in outs] == ref[:3]
    assert [o.num_cached_tokens for o in outs] == [96, 96, 48]
    assert ReplayGraph.replays - before == 3 * 6  # each: one tail step + 5 decode steps
    g.engine.kv.reset_prefix_cache()  # the host tier serves the prefix; the copy-in precedes the tail
    out = g.generate([prompts[1]], sp)[0]
    assert out.outputs[0].token_ids == ref[1] and out.num_cached_tokens == 96
    assert g.get_metrics()["offload"]["host"]["hits"] >= 6


class RefusesLargeBatches(ReplayGraphBackend):
    """Captures decode steps of up to 4 rows only (as cpu_amx refuses a MoE bucket past its
    fused kernel's reach): the larger buckets run eagerly, the smaller stay captured."""
    name = "test_replay_graphs_small"

    def capture_graph(self, fn, *args):
        out = fn(*args)
        logits = out[0] if isinstance(out, tuple) else out
        return None if logits.shape[0] > 4 else super().capture_graph(fn, *args)


def test_a_refused_bucket_leaves_the_others_captured(checkpoint):
    hal.register(RefusesLargeBatches)
    path = checkpoint("llama")
    prompts = [[5, 17, 42], list(range(10, 47)), [9] * 20, [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1], [4] * 3]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(str(path), dtype="float32", max_num_seqs=16,
                                                 backend="native").generate(prompts, sp)]
    g = LLM(str(path), dtype="float32", max_num_seqs=16, backend="test_replay_graphs_small")
    assert sorted(g.engine.runner.graphs) == [1, 2, 4]
    before = ReplayGraph.replays
    # 6 rows step eagerly until 4 or fewer are left, then replay the 4-row graph
    assert [o.outputs[0].token_ids for o in g.generate(prompts, sp)] == ref
    assert [o.outputs[0].token_ids for o in g.generate(prompts[:3], sp)] == ref[:3]
    assert ReplayGraph.replays > before
