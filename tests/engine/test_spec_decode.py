"""Speculative decoding: config validation, the proposers, the acceptance rules (a
statistical test that sampled output follows the target distribution), and end to end:
greedy and seeded output identical with and without speculation on every model family."""
from __future__ import annotations

import math

import pytest
import torch

from halserve.engine.spec import accept_deterministic, parse_speculative_config
from halserve.engine.spec.config import SpeculativeConfigError
from halserve.engine.spec.ngram import ngram_lookup


# ---- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, words", [
    ({"method": "medusa2", "num_speculative_tokens": 2}, ["'medusa2'", "callable, draft_model, eagle, ngram"]),
    ({"method": "eagle3", "num_speculative_tokens": 2}, ["'eagle3'", "not supported", "'eagle'"]),
    ({"method": "eagle", "num_speculative_tokens": 2}, ["model=None"]),
    ({"method": "ngram"}, ["num_speculative_tokens"]),
    ({"method": "ngram", "num_speculative_tokens": 0}, ["num_speculative_tokens=0", "[1, 32]"]),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_mix": 2}, ["'prompt_lookup_mix'"]),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
     ["prompt_lookup_min=5"]),
    ({"method": "callable", "num_speculative_tokens": 2, "proposer": 3}, ["proposer=3"]),
    ({"method": "draft_model", "num_speculative_tokens": 2}, ["model=None"]),
    ({"method": "callable", "num_speculative_tokens": 2, "proposer": len, "model": "x"}, ["'model'"]),
    ("ngram", ["dict"]),
])
def test_bad_config_is_a_clear_error(bad, words):
    with pytest.raises(SpeculativeConfigError) as e:
        parse_speculative_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_config_defaults_and_vllm_forms():
    c = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3})
    assert (c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == (3, 4, 1)
    assert parse_speculative_config({"model": "[ngram]", "num_speculative_tokens": 2}).method == "ngram"
    assert parse_speculative_config(None) is None and parse_speculative_config({}) is None


# ---- n-gram ---------------------------------------------------------------------------------
def test_ngram_prefers_longest_latest_match():
    toks = [9, 1, 2, 7, 7, 3, 1, 2, 8, 8, 5, 3, 1, 2]
    # suffix (3, 1, 2) occurred at 5: what followed was 8, 8, 5
    assert ngram_lookup(toks, 3, 1, 3) == [8, 8, 5]
    # with n <= 2 the latest (1, 2) is at 6 as well; with n == 1, the latest 2 is at 7
    assert ngram_lookup(toks, 1, 1, 2) == [8, 8]
    assert ngram_lookup([1, 2, 3], 3, 1, 4) == []
    # a match running into the suffix continues the repetition
    assert ngram_lookup([4, 1, 2, 1, 2, 1], 2, 2, 5) == [2, 1, 2, 1, 2]
    assert ngram_lookup([1, 2, 3, 1, 2], 2, 2, 0) == []


def test_ngram_proposer_drafts_what_the_lookup_rule_drafts():
    """The proposer (the rule matched from the last token back, on an array grown a step at a
    time) drafts exactly ``ngram_lookup``'s answer at every length of random sequences, small
    vocabularies making long and overlapping matches; a list replaced, or cut short, is re-read."""
    import random
    from types import SimpleNamespace

    from halserve.engine.spec.ngram import NgramProposer

    rng = random.Random(7)
    for trial in range(60):
        nmax = rng.randint(1, 5)
        cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4,
                                        "prompt_lookup_max": nmax, "prompt_lookup_min": rng.randint(1, nmax)})
        prop = NgramProposer(cfg, 512)
        vocab = rng.choice([2, 3, 6, 40])
        seq = SimpleNamespace(seq_id=trial, token_ids=[rng.randrange(vocab)], is_finished=False)
        while len(seq.token_ids) < 90:
            if rng.random() < 0.03:  # the list replaced by another (a rebuild)
                seq.token_ids = [rng.randrange(vocab) for _ in range(rng.randint(1, len(seq.token_ids)))]
            elif rng.random() < 0.03:  # cut short in place
                del seq.token_ids[rng.randint(1, len(seq.token_ids)):]
            k = rng.randint(0, 4)
            want = ngram_lookup(seq.token_ids, cfg.prompt_lookup_max, cfg.prompt_lookup_min, k)
            assert prop.propose([seq], [k]) == [want], (seq.token_ids, cfg, k)
            seq.token_ids.extend(rng.randrange(vocab) for _ in range(rng.randint(1, 5)))
        prop.finished(seq)
        assert not prop._arrays


# ---- acceptance rules ----------------------------------------------------------------------------
def test_accept_deterministic():
    assert accept_deterministic([5, 6, 7], [5, 6, 9, 4]) == [5, 6, 9]
    assert accept_deterministic([5, 6, 7], [5, 6, 7, 4]) == [5, 6, 7, 4]
    assert accept_deterministic([5, 6], [1, 6, 7]) == [1]
    assert accept_deterministic([], [3]) == [3]


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    keep = probs * n >= 5  # the usual validity rule; the rest pooled in one cell
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    exp = torch.cat([probs[keep] * n, (probs[~keep] * n).sum()[None]]).double()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


# ---- end to end ------------------------------------------------------------------------------
from halserve import LLM, AsyncLLM, SamplingParams  # noqa: E402
from tests.helpers.checkpoints import PRESETS  # noqa: E402

PROMPTS = [
    [5, 17, 42, 99, 3],
    list(range(10, 47)),  # 37 tokens: crosses two 16-token blocks
    [7, 7, 7, 200, 201, 202, 7, 7, 7, 200, 201, 30, 31, 7, 7, 7, 200],  # repeats: n-gram drafts
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


class Oracle:
    """Drafts the reference continuation, with every third draft position wrong: rows accept
    different numbers of tokens in one step, and both branches of the rule run."""

    def __init__(self, refs: dict[tuple, list[int]], vocab: int, k: int):
        self.refs, self.vocab, self.k = refs, vocab, k

    def draft_len(self, pos: int, prompt: tuple) -> int:
        return self.k

    def __call__(self, ids: list[int]) -> list[int]:
        for prompt, ref in self.refs.items():
            if tuple(ids[:len(prompt)]) == prompt:
                pos = len(ids) - len(prompt)
                m = self.draft_len(pos, prompt)
                return [(t + 1) % self.vocab if (pos + j) % 3 == 2 else t for j, t in enumerate(ref[pos:pos + m])]
        return []


def _tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _spec_metrics(llm):
    m = llm.get_metrics()
    return m["spec_decode_num_draft_tokens"], m["spec_decode_num_accepted_tokens"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_greedy_identical_with_speculation(checkpoint, preset):
    path = str(checkpoint(preset))
    ref = _tokens(LLM(path, dtype="float32", max_num_batched_tokens=64), PROMPTS, GREEDY)
    oracle = Oracle({tuple(p): r for p, r in zip(PROMPTS, ref)}, 512, 4)
    llm = LLM(path, dtype="float32", max_num_batched_tokens=64,
              speculative_config={"method": "callable", "proposer": oracle, "num_speculative_tokens": 4})
    assert _tokens(llm, PROMPTS, GREEDY) == ref
    drafted, accepted = _spec_metrics(llm)
    assert 0 < accepted < drafted  # accepted and rejected drafts both happened
    ngram = LLM(path, dtype="float32", max_num_batched_tokens=64,
                speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    assert _tokens(ngram, PROMPTS, GREEDY) == ref
    assert _spec_metrics(ngram)[0] > 0


def test_seeded_sampling_identical_with_speculation(checkpoint):
    """The draws are keyed by (seed, output position): a seeded request samples the same
    tokens with and without speculation; penalties and min_tokens see the drafts."""
    path = str(checkpoint("llama"))
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=11, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=1.3, seed=5, max_tokens=25, repetition_penalty=1.3,
                             frequency_penalty=0.5, min_tokens=20),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, presence_penalty=2.0,
                             frequency_penalty=2.0, repetition_penalty=2.0)]
    ref = _tokens(LLM(path, dtype="float32"), PROMPTS, params)
    oracle = Oracle({tuple(p): r for p, r in zip(PROMPTS, ref)}, 512, 5)
    llm = LLM(path, dtype="float32",
              speculative_config={"method": "callable", "proposer": oracle, "num_speculative_tokens": 5})
    assert _tokens(llm, PROMPTS, params) == ref
    assert 0 < _spec_metrics(llm)[1]


def test_sampled_output_follows_the_target_distribution(checkpoint):
    """Unseeded rows through the engine: the first token's frequencies under speculation
    match the target's softmax. The prompt is one block plus one token and its block is
    cached, so the first token is a verify step of the draft [top, top] (top: the target's
    most likely token, accepted about p(top) of the time)."""
    path = str(checkpoint("llama"))
    prompt = list(range(100, 117))  # 16 cached + 1 to compute
    base = LLM(path, dtype="float32")
    lp = base.generate([prompt], SamplingParams(temperature=1.0, max_tokens=1, logprobs=20))[0].outputs[0].logprobs[0]
    top = max(lp, key=lambda t: lp[t].logprob)
    probs = {t: math.exp(v.logprob) for t, v in lp.items()}
    llm = LLM(path, dtype="float32", max_num_seqs=256, seed=3,
              speculative_config={"method": "callable", "proposer": lambda ids: [top, top],
                                  "num_speculative_tokens": 2})
    llm.generate([prompt], SamplingParams(max_tokens=1))  # caches the prompt's block
    n = 1500
    outs = llm.generate([prompt] * n, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True))
    firsts = [o.outputs[0].token_ids[0] for o in outs]
    assert llm.get_metrics()["spec_decode_num_drafts"] >= n
    counts = torch.tensor([firsts.count(t) for t in probs] + [sum(f not in probs for f in firsts)],
                          dtype=torch.float64)
    expect = torch.tensor(list(probs.values()) + [max(0.0, 1 - sum(probs.values()))], dtype=torch.float64)
    assert _chi2_pvalue(counts, expect / expect.sum()) > 1e-3


def test_stops_logprobs_and_limits_with_speculation(checkpoint):
    path = str(checkpoint("llama"))
    base = LLM(path, dtype="float32")
    plain = base.generate(PROMPTS, GREEDY)
    # a stop token inside what a draft would accept, max_tokens not a multiple of k, logprobs
    stop_tok = plain[1].outputs[0].token_ids[7]
    params = [SamplingParams(temperature=0, max_tokens=13, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_tok]),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[plain[2].outputs[0].text[5:9]]
                             if plain[2].outputs[0].text[5:9].strip() else None)]
    ref = base.generate(PROMPTS, params)
    oracle = Oracle({tuple(p): o.outputs[0].token_ids for p, o in zip(PROMPTS, plain)}, 512, 4)
    llm = LLM(path, dtype="float32",
              speculative_config={"method": "callable", "proposer": oracle, "num_speculative_tokens": 4})
    got = llm.generate(PROMPTS, params)
    for r, g in zip(ref, got):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        assert g.outputs[0].text == r.outputs[0].text
        assert g.outputs[0].finish_reason == r.outputs[0].finish_reason
    a, b = ref[0].outputs[0].logprobs, got[0].outputs[0].logprobs
    assert len(a) == len(b) == 13
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 and x[t].rank == y[t].rank for t in x)


def test_preemption_chunked_prefill_and_prefix_cache(checkpoint):
    """A pool so small that sequences are preempted, prefills split in chunks, and a shared
    prefix: the output still equals the plain run's."""
    path = str(checkpoint("qwen3"))
    shared = list(range(40, 80))
    prompts = [shared + [i, i + 1] for i in range(6)] + PROMPTS
    kw = dict(dtype="float32", num_gpu_blocks_override=14, max_num_batched_tokens=24, block_size=8)
    ref = _tokens(LLM(path, **kw), prompts, GREEDY)
    oracle = Oracle({tuple(p): r for p, r in zip(prompts, ref)}, 512, 4)
    llm = LLM(path, **kw, speculative_config={"method": "callable", "proposer": oracle, "num_speculative_tokens": 4})
    assert _tokens(llm, prompts, GREEDY) == ref
    m = llm.get_metrics()
    assert m["num_preemptions_total"] > 0 and m["prefix_cache_hits"] > 0 and m["spec_decode_num_accepted_tokens"] > 0


def test_kv_offload_with_speculation(checkpoint):
    """Blocks committed token by token from verify steps are written through to the host
    tier; after the device prefix cache is dropped, the tier serves them and the output is
    unchanged."""
    path = str(checkpoint("llama"))
    ref = _tokens(LLM(path, dtype="float32"), PROMPTS, GREEDY)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}
    llm = LLM(path, dtype="float32", kv_offload_host_bytes=1 << 22, speculative_config=spec)
    assert _tokens(llm, PROMPTS, GREEDY) == ref
    llm.engine.kv.reset_prefix_cache()
    again = [p + r[:20] for p, r in zip(PROMPTS, ref)]  # prompts reaching into generated blocks
    assert _tokens(llm, again, GREEDY.clone(max_tokens=10)) == [r[20:30] for r in ref]
    assert llm.get_metrics()["offload"]["host"]["hits"] > 0


def test_draft_model(checkpoint):
    path = str(checkpoint("llama"))
    ref = _tokens(LLM(path, dtype="float32"), PROMPTS, GREEDY)
    # the target as its own draft: every draft token is accepted (its KV bookkeeping is right)
    same = LLM(path, dtype="float32",
               speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 3})
    assert _tokens(same, PROMPTS, GREEDY) == ref
    drafted, accepted = _spec_metrics(same)
    assert drafted > 0 and accepted == drafted
    # another architecture with the same tokenizer: lossless whatever it drafts
    other = str(checkpoint("qwen3", seed=3, num_hidden_layers=1))
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=40,
              speculative_config={"method": "draft_model", "model": other, "num_speculative_tokens": 3})
    assert _tokens(llm, PROMPTS, GREEDY) == ref
    assert llm.engine.kv.num_blocks == 40  # both models' KV in 40 blocks of the one pool
    with pytest.raises(ValueError, match="vocab_size"):
        LLM(path, dtype="float32", speculative_config={
            "method": "draft_model", "num_speculative_tokens": 2,
            "model": str(checkpoint("llama", seed=4, vocab_size=600))})


def test_aborted_and_failed_requests_drop_proposer_state(checkpoint):
    """A draft model keeps per-sequence KV bookkeeping; a request that leaves by abort or by
    a failure (not by finishing) must drop it too, or a long-running server leaks it."""
    path = str(checkpoint("llama"))
    llm = LLM(path, dtype="float32",
              speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 2})
    eng = llm.engine
    for rid, prompt in zip("abc", PROMPTS):
        eng.add_request(rid, prompt, GREEDY)
    for _ in range(3):
        eng.step()
    state = eng.proposer._valid
    ids = {r: [s.seq_id for s in eng.requests[r].seqs] for r in "abc"}
    assert all(i in state for r in "abc" for i in ids[r])  # every running sequence has state
    eng.abort_request("a")
    eng._fail_request("b", RuntimeError("injected"))
    assert not any(i in state for r in "ab" for i in ids[r])
    assert all(i in state for i in ids["c"])


def test_batch_invariant_with_speculation(checkpoint):
    path = str(checkpoint("llama"))
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    llm = LLM(path, dtype="float32", batch_invariant=True, speculative_config=spec)
    batched = _tokens(llm, PROMPTS, GREEDY)
    assert [_tokens(llm, [p], GREEDY)[0] for p in PROMPTS] == batched


def test_bad_proposer_ends_only_its_request(checkpoint):
    path = str(checkpoint("llama"))

    def proposer(ids):
        return [10_000] if ids[0] == 7 else [ids[-1]]

    llm = LLM(path, dtype="float32",
              speculative_config={"method": "callable", "proposer": proposer, "num_speculative_tokens": 2})
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length", "error"]
    with pytest.raises(ValueError, match="speculative_config method='nope'"):
        LLM(path, speculative_config={"method": "nope", "num_speculative_tokens": 2})


def test_async_and_metrics_render(checkpoint):
    import asyncio

    from halserve.server.metrics import ServerMetrics

    path = str(checkpoint("llama"))
    ref = _tokens(LLM(path, dtype="float32"), PROMPTS[2:], GREEDY)
    allm = AsyncLLM(path, dtype="float32",
                    speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})

    async def run():
        last = None
        async for out in allm.generate(PROMPTS[2], GREEDY, request_id="a"):
            last = out
        return last.outputs[0].token_ids

    try:
        assert asyncio.run(run()) == ref[0]
        text = ServerMetrics(allm.get_metrics, "m").render().decode()
    finally:
        allm.shutdown()
    assert 'halserve:spec_decode_num_accepted_tokens_total{model_name="m"}' in text
    assert "halserve:spec_decode_acceptance_rate" in text


def test_cli_flag_parses_json():
    import argparse

    from halserve.generate_cli import add_engine_arguments, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    args = p.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert engine_kwargs(args)["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="not valid JSON"):
        engine_kwargs(p.parse_args(["--speculative-config", "{ngram"]))


def test_verify_graph_matches_eager(checkpoint):
    """One sequence verifying a draft runs as a captured step returning every position's
    logits (checked with a backend whose 'graph' replays the captured step function)."""
    from halserve import hal
    from tests.engine.test_graphs import ReplayGraphBackend

    hal.register(ReplayGraphBackend)
    path = str(checkpoint("llama"))
    ref = _tokens(LLM(path, dtype="float32", enforce_eager=True), PROMPTS, GREEDY)
    oracle = Oracle({tuple(p): r for p, r in zip(PROMPTS, ref)}, 512, 5)
    g = LLM(path, dtype="float32", backend="test_replay_graphs",
            speculative_config={"method": "callable", "proposer": oracle, "num_speculative_tokens": 5})
    runner = g.engine.runner
    assert sorted(runner.verify.graphs) == runner.graph_buckets(64)  # max_num_seqs' buckets
    replays = []

    class Counted:
        def __init__(self, graph):
            self.graph = graph

        def replay(self):
            replays.append(1)
            return self.graph.replay()

    runner.verify.graphs = {b: Counted(x) for b, x in runner.verify.graphs.items()}
    assert [_tokens(g, [p], GREEDY)[0] for p in PROMPTS] == ref
    steps = g.get_metrics()["spec_decode_num_drafts"]
    assert steps > 0 and len(replays) == steps  # every verify step of one sequence: a graph
