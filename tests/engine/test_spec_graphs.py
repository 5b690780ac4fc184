"""Speculative steps in captured graphs (engine/spec/verify_graph.py), on the CPU with the
test double whose 'graph' replays the captured step function on the static buffers (the
staging and padding logic of the captured path, run on the native backend): greedy output
identical to eager decode without speculation, rows accepting different numbers of tokens
in one replay, padding writing nowhere, and an EAGLE head fed by captured steps drafting
exactly what it drafts fed by eager ones."""
from __future__ import annotations


from halserve import LLM, SamplingParams, hal
from tests.engine.test_graphs import ReplayGraph, ReplayGraphBackend
from tests.engine.test_spec_decode import PROMPTS, Oracle, _spec_metrics, _tokens
from tests.engine.test_spec_eagle import copyable_target, make_head

MORE = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6], list(range(300, 321))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
LONG = list(range(20, 120))  # 6 full blocks + 4 tokens


class RaggedOracle(Oracle):
    """Drafts 1..k tokens of the reference continuation (the count varies with the
    position), every third draft position wrong: the rows of one verify step carry drafts of
    different lengths and accept different numbers of them."""

    def draft_len(self, pos: int, prompt: tuple) -> int:
        return 1 + (pos * 7 + len(prompt)) % self.k


def _slots_of(so, bs: int) -> set[int]:
    out = set()
    for s in so.scheduled:
        seq = s.seq
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens):
            out.add(seq.block_ids[p // bs] * bs + p % bs)
    return out


def test_batched_verify_graphs(checkpoint):
    hal.register(ReplayGraphBackend)
    path = str(checkpoint("llama"))
    ref = _tokens(LLM(path, dtype="float32", enforce_eager=True, backend="native"), MORE, GREEDY)
    oracle = RaggedOracle({tuple(p): r for p, r in zip(MORE, ref)}, 512, 4)
    llm = LLM(path, dtype="float32", backend="test_replay_graphs", max_num_seqs=8, max_num_batched_tokens=64,
              speculative_config={"method": "callable", "proposer": oracle, "num_speculative_tokens": 4})
    runner = llm.engine.runner
    assert sorted(runner.verify.graphs) == [1, 2, 4, 8] and runner.verify.width == 5
    # (checked after the run: the engine turns an exception inside a step into failed requests)
    staged_by_verify, graph_steps, stray, missed = [], [], [], []
    stage, execute = runner.verify.stage, runner.execute

    def spy_stage(so, extra=()):
        out = stage(so, extra)
        staged_by_verify.append(out is not None)
        return out

    def checked_execute(so):
        """Every step writes KV at its rows' query positions and nowhere else."""
        before = runner.kv_cache.clone()
        staged_by_verify.clear()
        result = execute(so)
        kv = runner.kv_cache
        assert kv.shape[1:4] == (2, runner.num_blocks, runner.block_size)  # [L, 2, blocks, block size, ...]
        changed = (kv != before).reshape(kv.shape[0], 2, runner.num_blocks * runner.block_size, -1)
        changed = set(changed.any(-1).any(1).any(0).nonzero().flatten().tolist())
        stray.extend(sorted(changed - _slots_of(so, runner.block_size)))
        pure = any(s.spec_token_ids for s in so.scheduled) and all(
            s.samples and s.num_new_tokens == 1 + len(s.spec_token_ids) for s in so.scheduled)
        missed.append(any(staged_by_verify) != pure)
        if pure:
            emitted = [len(e) for e, _ in (result.spec or {}).values()]
            graph_steps.append((len(so.scheduled), sorted({len(s.spec_token_ids) for s in so.scheduled}), emitted))
        return result

    runner.verify.stage = spy_stage
    runner.execute = checked_execute
    out = _tokens(llm, MORE, GREEDY)
    assert not stray, stray  # KV written outside the step's rows: a padding row or token wrote
    assert not any(missed)  # every verify step of decoding rows replayed a graph, no other step did
    assert out == ref
    drafted, accepted = _spec_metrics(llm)
    assert 0 < accepted < drafted
    # 5 rows in the 8-row graph (3 padding rows), then fewer as they finish
    assert any(n == 5 for n, _, _ in graph_steps), graph_steps
    assert any(len(lens) > 1 for _, lens, _ in graph_steps)  # drafts of different lengths in one replay
    assert any(len(set(em)) > 1 for _, _, em in graph_steps)  # rows accepting different numbers
    assert len(graph_steps) >= 8
    # one sequence, its verify steps in the 1-row graph
    assert _tokens(llm, MORE[:1], GREEDY) == ref[:1]


def test_eagle_in_graphs_matches_eagle_eager(checkpoint, tmp_path):
    """The captured steps (decode, verify, and a prefix hit's tail) return the hidden states
    the head reads, and the head's own single-token forwards (drafts 2..k) replay graphs
    too: it drafts exactly what it drafts when every step runs eagerly, and the
    output equals plain decode's. The identity head's drafts are argmax lm_head(h) of the
    hidden row it reads, the copy head's follow the target: a wrong or stale row changes
    them. (The double, like a real graph, rewrites one output buffer at every replay.)"""
    hal.register(ReplayGraphBackend)
    one = copyable_target(checkpoint("llama", seed=5, num_hidden_layers=1), tmp_path / "target")
    plain = LLM(str(one), dtype="float32", enforce_eager=True, backend="native")
    ref = _tokens(plain, MORE, GREEDY)
    ref_long = _tokens(plain, [LONG, LONG + [7, 8, 9]], GREEDY)
    for kind in ("copy", "identity"):
        head = make_head(tmp_path / kind, one, kind)
        spec = {"method": "eagle", "model": str(head), "num_speculative_tokens": 4}
        runs = {}
        for eager in (True, False):
            llm = LLM(str(one), dtype="float32", backend="test_replay_graphs", max_num_seqs=8,
                      max_num_batched_tokens=64, enforce_eager=eager, speculative_config=spec)
            assert bool(llm.engine.runner.graphs) != eager
            prop, drafts, head_replays = llm.engine.proposer, [], []
            inner = prop.propose
            assert (prop.graphs is None) == eager  # the head's drafting forwards are captured too
            if not eager:
                draft = prop.graphs.draft
                prop.graphs.draft = lambda *a: head_replays.append(1) or draft(*a)

            def spy(seqs, ks, inner=inner, drafts=drafts):
                out = inner(seqs, ks)
                drafts.extend((s.request_id, s.num_tokens, d) for s, d in zip(seqs, out))
                return out

            prop.propose = spy
            replays = ReplayGraph.replays
            assert _tokens(llm, MORE, GREEDY) == ref
            # a prefix hit: the tail runs in a graph and starts the head's context there
            assert [_tokens(llm, [p], GREEDY)[0] for p in (LONG, LONG + [7, 8, 9])] == ref_long
            runs[eager] = (sorted(drafts), _spec_metrics(llm), ReplayGraph.replays - replays)
        assert runs[True][:2] == runs[False][:2], kind  # the same drafts, the same acceptance
        assert runs[True][2] == 0 and runs[False][2] > 10 and len(head_replays) > 5
        if kind == "copy":
            assert runs[False][1][1] > 0.5 * runs[False][1][0]  # most of its drafts are accepted


def test_seeded_sampling_in_verify_graphs(checkpoint):
    """Seeded draws in captured verify steps (the sampling state of every position uploaded
    with the step) are the draws of plain decode, with and without logits processors."""
    hal.register(ReplayGraphBackend)
    path = str(checkpoint("llama"))
    plain = LLM(path, dtype="float32", enforce_eager=True, backend="native")
    no_processors = [SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=11, max_tokens=30, ignore_eos=True),
                     SamplingParams(temperature=1.2, min_p=0.05, seed=3, max_tokens=30, ignore_eos=True),
                     SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)]
    processors = [SamplingParams(temperature=1.3, seed=5, max_tokens=25, repetition_penalty=1.3,
                                 frequency_penalty=0.5, min_tokens=20),
                  SamplingParams(temperature=0.7, seed=8, max_tokens=25, logit_bias={3: 2.0}),
                  SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, presence_penalty=2.0)]
    refs = [_tokens(plain, PROMPTS, ps) for ps in (no_processors, processors)]
    oracle = RaggedOracle({tuple(p): r for p, r in zip(PROMPTS, refs[0])}, 512, 5)
    llm = LLM(path, dtype="float32", backend="test_replay_graphs", max_num_seqs=4,
              speculative_config={"method": "callable", "proposer": oracle, "num_speculative_tokens": 5})
    before = ReplayGraph.replays
    assert _tokens(llm, PROMPTS, no_processors) == refs[0]
    assert ReplayGraph.replays - before > 5 and _spec_metrics(llm)[1] > 0
    oracle.refs = {tuple(p): r for p, r in zip(PROMPTS, refs[1])}
    accepted = _spec_metrics(llm)[1]
    assert _tokens(llm, PROMPTS, processors) == refs[1]
    assert _spec_metrics(llm)[1] > accepted


def test_verify_graphs_batch_invariant(checkpoint):
    """Batch-invariant mode (attention a sequence at a time, reading the host lengths the
    runner keeps true for a replayed step): captured verify steps give plain decode's tokens."""
    hal.register(ReplayGraphBackend)
    path = str(checkpoint("llama"))
    ref = _tokens(LLM(path, dtype="float32", batch_invariant=True, backend="native"), MORE, GREEDY)
    oracle = RaggedOracle({tuple(p): r for p, r in zip(MORE, ref)}, 512, 3)
    llm = LLM(path, dtype="float32", backend="test_replay_graphs", batch_invariant=True, max_num_seqs=8,
              speculative_config={"method": "callable", "proposer": oracle, "num_speculative_tokens": 3})
    before = ReplayGraph.replays
    assert _tokens(llm, MORE, GREEDY) == ref
    assert ReplayGraph.replays - before > 8 and 0 < _spec_metrics(llm)[1] < _spec_metrics(llm)[0]


def test_verify_staging_is_one_copy(checkpoint):
    """A verify step's staging (the host's work between two replays) writes its inputs and its
    draws' sampling state into a page-locked mirror and sends it in one copy: the only torch
    calls are that copy_ and the views it reads and returns (no tensor made, split or copied
    field by field a step); the output stays plain decode's."""
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    hal.register(ReplayGraphBackend)
    path = str(checkpoint("llama"))
    ref = _tokens(LLM(path, dtype="float32", enforce_eager=True, backend="native"), MORE, GREEDY)
    oracle = RaggedOracle({tuple(p): r for p, r in zip(MORE, ref)}, 512, 4)
    llm = LLM(path, dtype="float32", backend="test_replay_graphs", max_num_seqs=8,
              speculative_config={"method": "callable", "proposer": oracle, "num_speculative_tokens": 4})
    verify = llm.engine.runner.verify
    stage, staged = verify.stage, []

    def spy(so, extra=()):
        with Calls() as calls:
            out = stage(so, extra)
        if out is not None:
            staged.append(calls.names)
        return out

    verify.stage = spy
    assert _tokens(llm, MORE, GREEDY) == ref
    assert len(staged) > 5
    for names in staged:
        assert names.count("copy_") == 1 and set(names) == {"copy_", "__getitem__"}, names
