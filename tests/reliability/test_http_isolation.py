"""Over HTTP: a poisoned request (one that fails inside a step) and bad requests, sent
together with good ones, end alone; every good one gets the tokens it gets alone."""
from __future__ import annotations

import asyncio
import json

import httpx

from tests.reliability.conftest import MODEL, assert_openai_error
from tests.reliability.test_isolation import POISON_SEED, _poison

PROMPTS = [[5, 17, 42, 99, 3], list(range(10, 40)), [7, 7, 7, 200, 201]]


def body(prompt, **kw):
    return {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0.0, "ignore_eos": True, **kw}


async def _tokens(client, b) -> list[int] | httpx.Response:
    if not b.get("stream"):
        r = await client.post("/v1/completions", json={**b, "logprobs": 0})
        if r.status_code != 200:
            return r
        return r.json()["choices"][0]["logprobs"]["tokens"]
    toks, err = [], None
    async with client.stream("POST", "/v1/completions", json={**b, "logprobs": 0}) as r:
        if r.status_code != 200:
            await r.aread()
            return r
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                err = chunk["error"]
                continue
            toks += chunk["choices"][0]["logprobs"]["tokens"]
    return {"stream_error": err} if err else toks


def test_poisoned_and_bad_requests_over_http(app, monkeypatch):
    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            alone = [await _tokens(c, body(p)) for p in PROMPTS]
            _poison(monkeypatch)
            jobs = [_tokens(c, body(p, stream=i % 2 == 1)) for i, p in enumerate(PROMPTS * 2)]
            jobs += [_tokens(c, body(PROMPTS[1], seed=POISON_SEED)),
                     _tokens(c, body(PROMPTS[1], seed=POISON_SEED, stream=True)),
                     _tokens(c, body(PROMPTS[0], logit_bias={"99999": 5})),
                     _tokens(c, body(PROMPTS[0], stop_token_ids=[100000]))]
            return alone, await asyncio.wait_for(asyncio.gather(*jobs), 120)

    alone, got = asyncio.run(run())
    assert got[:6] == alone * 2
    poisoned, poisoned_stream, bias, stop = got[6:]
    # it fails at its first step, before any header is out: a 500 with an OpenAI body
    for r in (poisoned, poisoned_stream):
        assert isinstance(r, httpx.Response) and r.status_code == 500, r
        assert assert_openai_error(r)["type"] == "server_error"
    for r in (bias, stop):
        assert r.status_code == 400
        assert_openai_error(r)
