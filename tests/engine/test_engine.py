"""End-to-end engine behaviour on tiny checkpoints: HF parity, batching, prefix cache,
preemption, chunked prefill, sampling, stop conditions, AsyncLLM streaming and abort."""
from __future__ import annotations

import asyncio

import pytest
import torch

from halserve import LLM, AsyncLLM, SamplingParams
from halserve.engine.outputs import accumulate
from tests.helpers.checkpoints import PRESETS, make_checkpoint

PROMPTS = [
    [5, 17, 42, 99, 3],
    list(range(10, 47)),  # 37 tokens: crosses two 16-token blocks
    [7] * 3 + [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
# HF's min_new_tokens masks eos; min_tokens does the same here, so both pick the same tokens
PARITY = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = make_checkpoint(preset, tmp_path_factory.mktemp(preset))
        return cache[preset]

    return get


def hf_greedy(path, prompts, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)
        outs.append(g[0, len(p):].tolist())
    return outs


@pytest.mark.parametrize("preset", list(PRESETS))
def test_greedy_matches_transformers(ckpts, preset):
    path = ckpts(preset)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=64)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARITY)]
    assert got == hf_greedy(path, PROMPTS, 32)


def test_alone_equals_batched_and_chunked(ckpts):
    path = ckpts("qwen3")
    llm = LLM(str(path), dtype="float32")
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert batched == alone
    small = LLM(str(path), dtype="float32", max_num_batched_tokens=8)  # forces chunked prefill
    assert [o.outputs[0].token_ids for o in small.generate(PROMPTS, GREEDY)] == alone


def test_prefix_cache_hits_give_same_outputs(ckpts):
    path = ckpts("llama")
    base = list(range(20, 70))  # 50 tokens: three full blocks
    prompts = [base + [3, 4], base + [5, 6, 7]]
    on = LLM(str(path), dtype="float32")
    first = on.generate([prompts[0]], GREEDY)[0].outputs[0].token_ids
    second = on.generate([prompts[1]], GREEDY)[0]
    assert second.num_cached_tokens == 48
    assert on.get_metrics()["prefix_cache_hits"] >= 48
    again = on.generate([prompts[0]], GREEDY)[0]  # full-prompt hit still recomputes the tail
    off = LLM(str(path), dtype="float32", enable_prefix_caching=False)
    ref = [o.outputs[0].token_ids for o in off.generate(prompts, GREEDY)]
    assert [first, second.outputs[0].token_ids] == ref
    assert again.outputs[0].token_ids == ref[0]
    assert off.get_metrics()["prefix_cache_hits"] == 0


def test_preemption_gives_same_outputs(ckpts):
    path = ckpts("mistral")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(str(path), dtype="float32").generate(PROMPTS * 2, params)]
    tiny = LLM(str(path), dtype="float32", num_gpu_blocks_override=10)
    got = [o.outputs[0].token_ids for o in tiny.generate(PROMPTS * 2, params)]
    assert tiny.get_metrics()["num_preemptions_total"] > 0
    assert got == ref


def test_seeded_sampling_reproducible(ckpts):
    path = ckpts("qwen2")
    llm = LLM(str(path), dtype="float32")
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True, n=2)
    a = llm.generate(PROMPTS, sp)
    b = llm.generate(PROMPTS[::-1], sp)[::-1]  # different batch mates and order
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
    assert a[0].outputs[0].token_ids != a[0].outputs[1].token_ids  # n=2 draws differ
    c = llm.generate(PROMPTS, sp.clone(seed=99))
    assert [o.outputs[0].token_ids for o in c] != [o.outputs[0].token_ids for o in a]


def test_stop_conditions_and_logprobs(ckpts):
    path = ckpts("llama")
    llm = LLM(str(path), dtype="float32")
    ref = llm.generate([PROMPTS[1]], GREEDY)[0].outputs[0]
    # stop token id: the 5th generated token
    stop_tok = ref.token_ids[4]
    first = ref.token_ids.index(stop_tok)
    o = llm.generate([PROMPTS[1]], GREEDY.clone(stop_token_ids=[stop_tok]))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop_tok and o.token_ids == ref.token_ids[:first + 1]
    o = llm.generate([PROMPTS[1]], GREEDY.clone(max_tokens=5))[0].outputs[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 5
    # stop string: a piece of the greedy text
    if len(ref.text) > 8:
        s = ref.text[3:6]
        o = llm.generate([PROMPTS[1]], GREEDY.clone(stop=[s]))[0].outputs[0]
        assert o.finish_reason == "stop" and o.stop_reason == s and s not in o.text
        assert ref.text.startswith(o.text)
    o = llm.generate([PROMPTS[1]], GREEDY.clone(logprobs=3, max_tokens=6))[0].outputs[0]
    assert len(o.logprobs) == 6
    for tok, lp in zip(o.token_ids, o.logprobs):
        assert tok in lp and lp[tok].rank == 1 and len(lp) == 3  # greedy: the chosen is the top-1
        assert all(v.logprob <= 0 for v in lp.values())
    assert o.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)))


def test_eos_and_min_tokens(ckpts):
    path = ckpts("llama")
    llm = LLM(str(path), dtype="float32")
    eos = llm.engine.eos_token_ids[0]
    # bias eos so greedy picks it at once; min_tokens must hold it back
    sp = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={eos: 100.0})
    o = llm.generate([PROMPTS[0]], sp)[0].outputs[0]
    assert o.token_ids == [eos] and o.finish_reason == "stop"
    o = llm.generate([PROMPTS[0]], sp.clone(min_tokens=4))[0].outputs[0]
    assert len(o.token_ids) == 5 and o.token_ids[-1] == eos and eos not in o.token_ids[:4]


def test_bad_input_is_a_clear_error(ckpts):
    path = ckpts("llama")
    llm = LLM(str(path), dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(1, 80))], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[100000]], GREEDY)
    assert llm.generate([PROMPTS[0]], GREEDY.clone(max_tokens=3))[0].outputs[0].finish_reason == "length"


def test_async_streaming_and_abort(ckpts):
    path = ckpts("llama")
    llm = AsyncLLM(str(path), dtype="float32")
    ref = LLM(str(path), dtype="float32").generate([PROMPTS[1]], GREEDY)[0].outputs[0].token_ids

    async def run():
        seen = []
        async for out in llm.generate(PROMPTS[1], GREEDY, "r1"):
            seen.append(len(out.outputs[0].token_ids))
        assert out.finished and out.outputs[0].token_ids == ref
        assert seen == sorted(seen) and len(seen) > 1  # streamed, cumulative
        agen = llm.generate(PROMPTS[2], SamplingParams(max_tokens=200, ignore_eos=True), "r2")
        async for out in agen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await agen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            m = llm.get_metrics()
            if m["kv_cache_usage"] == 0 and m["num_requests_running"] == 0:
                break
        assert llm.get_metrics()["kv_cache_usage"] == 0

    try:
        asyncio.run(run())
    finally:
        llm.shutdown()


@pytest.mark.parametrize("chunk", [64, 8])  # 8: the prompt is scored across several chunks
def test_prompt_logprobs_match_transformers(ckpts, chunk):
    from transformers import AutoModelForCausalLM

    path = ckpts("llama")
    prompt = PROMPTS[1]
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=chunk)
    llm.generate([prompt], GREEDY.clone(max_tokens=2))  # cached now: must not skip scoring
    out = llm.generate([prompt], GREEDY.clone(max_tokens=2, prompt_logprobs=2))[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), -1)
    for p in range(1, len(prompt)):
        tok = prompt[p]
        got = plp[p]
        assert got[tok].logprob == pytest.approx(ref[p - 1, tok].item(), abs=1e-4)
        assert got[tok].rank == int((ref[p - 1] > ref[p - 1, tok]).sum()) + 1
        assert len(got) in (2, 3)  # top-2 plus the prompt token when it is not among them


def test_delta_outputs_add_up_to_the_cumulative_ones(ckpts):
    """``delta`` outputs carry only what is new each step: concatenated they give the same
    token ids, text and logprobs as the ``cumulative`` run, text that could start a stop
    string is never sent before it is known not to be one, and ``final`` gives one output."""
    path = ckpts("llama")
    llm = LLM(str(path), dtype="float32")
    eng = llm.engine
    # a stop string across two tokens' text, first seen there: the first token's last
    # character must be held back until the next one shows whether it starts the stop
    eng.add_request("pieces", PROMPTS[1], GREEDY, output_kind="delta")
    pieces = []
    while eng.has_unfinished():
        pieces += [o.outputs[0].text for o in eng.step()]
    text, stop = "", None
    for a, b in zip(pieces, pieces[1:]):
        cand = a[-1:] + b[:2]
        if len(cand) == 3 and cand not in text + a[:-1]:
            stop = cand
            break
        text += a
    assert stop is not None
    for sp in (GREEDY.clone(logprobs=2, max_tokens=12), GREEDY.clone(stop=[stop])):
        for kind in ("cumulative", "delta", "final"):
            eng.add_request(kind, PROMPTS[1], sp, output_kind=kind)
        steps = {"cumulative": [], "delta": [], "final": []}
        while eng.has_unfinished():
            for o in eng.step():
                steps[o.request_id].append(o)
        cum = steps["cumulative"][-1].outputs[0]
        deltas = [o.outputs[0] for o in steps["delta"]]
        assert sum((d.token_ids for d in deltas), []) == cum.token_ids
        assert "".join(d.text for d in deltas) == cum.text
        assert all(len(d.token_ids) <= 1 for d in deltas)  # never the whole sequence again
        acc = None
        for o in steps["delta"]:  # what the server does for a non-streaming request
            acc = accumulate(acc, o)
        got = acc.outputs[0]
        assert (got.text, got.token_ids, got.logprobs, got.finish_reason, got.stop_reason, acc.finished) == \
            (cum.text, cum.token_ids, cum.logprobs, cum.finish_reason, cum.stop_reason, True)
        if sp.logprobs is not None:
            assert sum((d.logprobs for d in deltas), []) == cum.logprobs
        if sp.stop:
            assert all(stop not in d.text for d in deltas) and cum.finish_reason == "stop"
            sent = ""
            for d in deltas:
                sent += d.text
                assert cum.text.startswith(sent)  # nothing sent that the stop string took back
        assert len(steps["final"]) == 1 and steps["final"][0].finished
        assert steps["final"][0].outputs[0].token_ids == cum.token_ids
    # prompt logprobs: once in the delta stream, and whole
    sp = GREEDY.clone(prompt_logprobs=2, max_tokens=4)
    eng.add_request("plp-c", PROMPTS[1], sp)
    eng.add_request("plp-d", PROMPTS[1], sp, output_kind="delta")
    seen = {"plp-c": [], "plp-d": []}
    while eng.has_unfinished():
        for o in eng.step():
            seen[o.request_id].append(o)
    carried = [o.prompt_logprobs for o in seen["plp-d"] if o.prompt_logprobs is not None]
    assert len(carried) == 1 and carried[0] == seen["plp-c"][-1].prompt_logprobs
    assert len(carried[0]) == len(seen["plp-c"][-1].prompt_token_ids)
    with pytest.raises(ValueError, match="output_kind='partial'; valid: cumulative, delta, final"):
        eng.add_request("x", PROMPTS[0], GREEDY, output_kind="partial")
