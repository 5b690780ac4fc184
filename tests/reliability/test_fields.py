"""Fields that were accepted and ignored now work on the real engine over HTTP:
prompt_logprobs, echo with logprobs, best_of (completions, as in vLLM)."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from halserve import SamplingParams
from tests.reliability.conftest import MODEL

PROMPT = [5, 17, 42, 99, 3, 250, 11]


def post(app, path, body):
    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            return await c.post(path, json=body)
    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    return r.json()


def direct(engine, sp):
    async def run():
        last = None
        async for out in engine.generate(PROMPT, sp, f"direct-{id(sp)}"):
            last = out
        return last
    return asyncio.run(run())


def test_prompt_logprobs(app, engine):
    got = post(app, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2,
                                        "temperature": 0.0, "prompt_logprobs": 2})
    ref = direct(engine, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)).prompt_logprobs
    plp = got["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(PROMPT) and plp[0] is None
    for d, r, tok in zip(plp[1:], ref[1:], PROMPT[1:]):
        assert d[str(tok)]["logprob"] == pytest.approx(r[tok].logprob, abs=1e-5)
        assert d[str(tok)]["rank"] == r[tok].rank
    chat = post(app, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 2, "prompt_logprobs": 0})
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) > 1


def test_echo_with_logprobs(app, engine):
    got = post(app, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3,
                                        "temperature": 0.0, "echo": True, "logprobs": 1})
    ref = direct(engine, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1, logprobs=1))
    lp = got["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(PROMPT) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [ref.prompt_logprobs[i][t].logprob for i, t in enumerate(PROMPT) if i] + \
           [d[t].logprob for d, t in zip(ref.outputs[0].logprobs, ref.outputs[0].token_ids)]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_best_of_picks_the_most_likely(app, engine):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 7,
            "best_of": 3, "n": 1}
    got = post(app, "/v1/completions", body)
    assert len(got["choices"]) == 1 and got["choices"][0]["logprobs"] is None
    ref = direct(engine, SamplingParams(temperature=1.0, max_tokens=6, seed=7, n=3, logprobs=0))
    best = max(ref.outputs, key=lambda c: c.cumulative_logprob)
    assert got["choices"][0]["text"] == best.text
    assert len({c.text for c in ref.outputs}) > 1  # the choice was a real one
    assert got["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in ref.outputs)
