"""One request never harms another: what a step could raise on is refused when the request is
added, and a row that still fails inside a step ends that request alone (LLM and AsyncLLM)."""
from __future__ import annotations

import asyncio

import pytest

from halserve import LLM, AsyncLLM, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3], list(range(10, 40)), [7, 7, 7, 200, 201]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
POISON_SEED = 666_666  # a seeded request the injected fault picks out


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint("qwen3")), dtype="float32")


@pytest.mark.parametrize("bad", [
    dict(logit_bias={99999: 5.0}), dict(logit_bias={-1: 1.0}), dict(logit_bias={3: float("inf")}),
    dict(stop_token_ids=[512]), dict(repetition_penalty=float("inf")), dict(n=10_000),
    dict(min_tokens=10_000, max_tokens=None), dict(seed=1 << 70), dict(max_tokens=True),
])
def test_bad_params_refused_when_added(llm, bad):
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    for k, v in bad.items():  # set after construction: the engine checks again when adding
        setattr(sp, k, v)
    with pytest.raises(ValueError) as e:
        llm.engine.add_request("bad", PROMPTS[0], sp)
    assert "valid" in str(e.value)
    assert not llm.engine.has_unfinished()


def _poison(monkeypatch):
    """A fault inside the step for the rows of one request only (seeded POISON_SEED)."""
    import halserve.engine.runner as runner

    real = runner.sample

    def sample(hal, logits, rows, *args, **kwargs):
        if any(r.params.seed == POISON_SEED for r in rows):
            raise RuntimeError("injected fault")
        return real(hal, logits, rows, *args, **kwargs)

    monkeypatch.setattr(runner, "sample", sample)


def test_failing_row_ends_only_its_request(llm, monkeypatch):
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    _poison(monkeypatch)
    bad = GREEDY.clone(seed=POISON_SEED)
    outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2]], [GREEDY, bad, GREEDY, GREEDY])
    assert [o.outputs[0].token_ids for o in (outs[0], outs[2], outs[3])] == alone
    assert outs[1].outputs[0].finish_reason == "error"
    assert not llm.engine.has_unfinished() and llm.engine.kv.usage == 0


def test_async_poisoned_and_bad_requests_leave_the_others(checkpoint, monkeypatch):
    llm = AsyncLLM(str(checkpoint("qwen3")), dtype="float32")
    try:
        async def one(i, prompt, sp):
            last = None
            async for out in llm.generate(prompt, sp, f"r{i}"):
                last = out
            return last.outputs[0].token_ids

        async def alone():
            return [await one(100 + i, p, GREEDY) for i, p in enumerate(PROMPTS)]

        ref = asyncio.run(alone())
        _poison(monkeypatch)

        async def mixed():
            jobs = [one(i, p, GREEDY) for i, p in enumerate(PROMPTS)]
            jobs.append(one(10, PROMPTS[1], GREEDY.clone(seed=POISON_SEED)))
            jobs.append(one(11, PROMPTS[0], GREEDY.clone(logit_bias={99999: 5.0})))
            return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 60)

        got = asyncio.run(mixed())
        assert got[:3] == ref
        assert isinstance(got[3], RuntimeError) and "injected" in str(got[3])
        assert isinstance(got[4], ValueError) and "logit_bias" in str(got[4])
    finally:
        llm.shutdown()


def test_async_abort_ends_the_consumer(checkpoint):
    llm = AsyncLLM(str(checkpoint("qwen3")), dtype="float32")
    try:
        async def run():
            outs = []
            sp = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
            async for out in llm.generate(PROMPTS[0], sp, "abort-me"):
                outs.append(out)
                if len(outs) == 1:
                    await llm.abort("abort-me")
            return outs

        outs = asyncio.run(asyncio.wait_for(run(), 30))
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert len(outs[-1].outputs[0].token_ids) < 200
    finally:
        llm.shutdown()


@pytest.mark.parametrize("bad", [dict(logit_bias={5: float("nan")}), dict(logit_bias={5: 101.0}),
                                 dict(logit_bias={-3: 1.0}), dict(repetition_penalty=float("inf"))])
def test_sampling_params_refuse_non_finite_bias_and_penalty(bad):
    with pytest.raises(ValueError, match="is not valid"):
        SamplingParams(**bad)
