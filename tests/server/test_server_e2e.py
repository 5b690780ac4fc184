"""End to end: a real ``halserve serve`` process on the tiny Llama checkpoint, driven with the
official ``openai`` client, its greedy output checked against ``LLM.generate``."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.server.server_proc import API_KEY, MODEL_NAME, ROOT

PROMPT = "The quick brown fox jumps over the lazy dog. Then"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}]


@pytest.fixture(scope="module")
def llm(tiny_model):
    from halserve import LLM

    return LLM(str(tiny_model), dtype="float32")


def greedy(max_tokens: int, **kw):
    from halserve import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server.url + "/health").status_code == 200
    assert "version" in httpx.get(server.url + "/version").json()
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_completion_matches_llm_generate(client, llm):
    ref = llm.generate([PROMPT], greedy(12))[0].outputs[0]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].finish_reason == ref.finish_reason

    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == ref.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_token_id_prompt(client, llm):
    ids = llm.get_tokenizer().encode(PROMPT)
    ref = llm.generate([ids], greedy(6))[0].outputs[0]
    r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == ref.text


def test_chat_matches_llm_chat(client, llm):
    ref = llm.chat(MESSAGES, greedy(10))[0].outputs[0]
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_sampling_options_and_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, n=3, temperature=1.0,
                                  top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5, logprobs=3,
                                  extra_body={"top_k": 20, "min_p": 0.01})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 5
        assert all(len(t) >= 3 for t in c.logprobs.top_logprobs)
    again = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, n=3, temperature=1.0,
                                      top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5,
                                      logprobs=3, extra_body={"top_k": 20, "min_p": 0.01})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded

    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, logprobs=True,
                                          top_logprobs=2, temperature=0, stop=["\n\n"])
    lp = chat.choices[0].logprobs.content
    assert lp and all(len(t.top_logprobs) == 2 for t in lp)
    assert lp[0].logprob <= lp[0].top_logprobs[0].logprob + 1e-6

    # n > 1 while streaming: every chunk says which choice it belongs to
    texts: dict[int, str] = {}
    for ch in client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, n=2,
                                             temperature=1.0, seed=3, stream=True):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert set(texts) == {0, 1}


def _expect_error(status: int, call, param: str | None = None):
    with pytest.raises(openai.APIStatusError) as ei:
        call()
    e = ei.value
    assert e.status_code == status, e
    body = e.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(prompt="word " * 5000), "prompt"),  # the served tiny model's max_model_len is 4096
    (dict(max_tokens=5000), "max_tokens"),
])
def test_bad_parameters_are_400(client, kwargs, param):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=4) | kwargs
    err = _expect_error(400, lambda: client.completions.create(**kw), param)
    assert err["type"] == "invalid_request_error"


def test_chat_errors(client):
    _expect_error(400, lambda: client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                              max_tokens=-3), "max_tokens")
    _expect_error(400, lambda: client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                              temperature=-1), "temperature")
    _expect_error(400, lambda: client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "fox " * 5000}]), "messages")
    _expect_error(404, lambda: client.chat.completions.create(model="gpt-4", messages=MESSAGES), "model")


def test_unknown_model_is_404(client):
    err = _expect_error(404, lambda: client.completions.create(model="no-such-model", prompt="x"), "model")
    assert err["code"] == "model_not_found"


def test_malformed_json_is_400(server):
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for body in (b'{"model": "tiny", "prompt": ', b"not json", b"[1, 2]", b""):
        r = httpx.post(server.url + "/v1/completions", content=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # health and metrics stay open, as in vLLM
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_disconnect_mid_stream_frees_kv(server):
    # 3,000 tokens (tiny_model allows 4,096 positions): seconds of work, so the request is still
    # running when the client leaves after 3 chunks and a few requests of its own (with 200 tokens
    # a busy box finished it first, and the abort path was never reached)
    aborted_before = _finished_count(server, "abort")
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                    if got == 3:
                        break
            assert metric(server, "halserve:kv_cache_usage_perc") > 0
            # the event loop is free while the engine works: /health answers at once
            t = time.perf_counter()
            assert httpx.get(server.url + "/health").status_code == 200
            assert time.perf_counter() - t < 1.0
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (metric(server, "halserve:kv_cache_usage_perc") == 0
                and metric(server, "halserve:num_requests_running") == 0):
            break
        time.sleep(0.1)
    assert metric(server, "halserve:kv_cache_usage_perc") == 0
    assert metric(server, "halserve:num_requests_running") == 0
    assert _finished_count(server, "abort") == aborted_before + 1


def _finished_count(server, reason: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(r'^halserve:request_success_total\{[^}]*finished_reason="' + reason + r'"[^}]*\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_32_concurrent_streams(server, llm):
    prompts = [f"Request number {i}: the {['red', 'green', 'blue', 'old'][i % 4]} fox said" for i in range(32)]
    refs = [o.outputs[0].text for o in llm.generate(prompts, greedy(8, ignore_eos=True))]

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, set[str]]:
        stream = await c.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        text, ids = "", set()
        async for ch in stream:
            ids.add(ch.id)
            assert [c.index for c in ch.choices] == [0]
            text += ch.choices[0].text
        return text, ids

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(run())
    for i, (text, ids) in enumerate(results):
        assert len(ids) == 1
        assert text == refs[i], f"stream {i}"
    assert len({next(iter(ids)) for _, ids in results}) == 32
    assert metric(server, "halserve:time_to_first_token_seconds_count") >= 32


def test_tokenize_detokenize(server, llm):
    h = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=h).json()
    assert r["tokens"] == llm.get_tokenizer().encode(PROMPT) and r["count"] == len(r["tokens"])
    d = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}, headers=h).json()
    assert d["prompt"] == llm.get_tokenizer().decode(r["tokens"])
    assert json.loads(httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 9]},
                                 headers=h).text)["error"]["param"] == "tokens"


def test_metrics_names(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("halserve:num_requests_running", "halserve:num_requests_waiting", "halserve:kv_cache_usage_perc",
                 "halserve:prefix_cache_queries_total", "halserve:prefix_cache_hits_total",
                 "halserve:prompt_tokens_total", "halserve:generation_tokens_total",
                 "halserve:time_to_first_token_seconds_bucket", "halserve:inter_token_latency_seconds_bucket",
                 "halserve:e2e_request_latency_seconds_bucket", "halserve:request_success_total"):
        assert name in text, name


def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "halserve.cli", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_cli_user_errors_are_one_line(server, tiny_model):
    r = _serve_cli("/no/such/model", "--port", "0")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    port = server.url.rsplit(":", 1)[1]  # already taken by the running server
    r = _serve_cli(str(tiny_model), "--host", "127.0.0.1", "--port", port)
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr


def test_startup_line_names_backend_and_why(server):
    log = server.log()
    line = next(ln for ln in log.splitlines() if ln.startswith("halserve serve: backend "))
    assert "kernels" in line and "(" in line  # the reason, from the probe
    assert sum(ln.startswith("halserve serve: backend") for ln in log.splitlines()) == 1
