"""Input hardening of the HTTP layer, in-process against the fake engine: strict types,
unknown and unimplemented fields refused by name, the body limit, the cheap length bound,
the Bearer scheme in any case, and a served /openapi.json and /docs."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from halserve.server.openai import build_app
from tests.server.fake_engine import FakeEngine


class VocabTokenizer:
    """The fake's byte tokenizer plus a vocabulary whose longest token is 4 characters."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def get_vocab(self):
        return {"abcd": 1, "a": 2}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, add_special_tokens=True):
        self.calls += 1
        return self.inner.encode(text, add_special_tokens)


@pytest.fixture
def engine():
    e = FakeEngine(max_model_len=64)
    e.tokenizer = VocabTokenizer(e.tokenizer)
    return e


@pytest.fixture
def http(engine):
    with TestClient(build_app(engine, ["fake"], max_body_bytes=4096), raise_server_exceptions=False) as c:
        yield c


def err(resp, status):
    assert resp.status_code == status, resp.text
    e = resp.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    return e


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "10"), ("n", "2"), ("stream", "yes"), ("temperature", "0.5"), ("echo", 1),
    ("logprobs", True), ("seed", 1.5),
])
def test_numbers_and_booleans_are_strict(http, field, value):
    e = err(http.post("/v1/completions", json={"prompt": "hi", field: value}), 400)
    assert e["param"] == field and field in e["message"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
@pytest.mark.parametrize("field", ["guided_json", "guided_choice", "guided_regex", "guided_grammar",
                                   "use_beam_search", "structured_outputs"])
def test_vllm_extensions_not_implemented_are_named(http, path, body, field):
    e = err(http.post(path, json={**body, field: ["a", "b"]}), 400)
    assert e["param"] == field and field in e["message"] and "not supported" in e["message"]


def test_unknown_fields_refused_as_openai_does(http):
    e = err(http.post("/v1/completions", json={"prompt": "hi", "frobnicate": 1}), 400)
    assert e["message"] == "Unrecognized request argument supplied: frobnicate"
    e = err(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                    "best_of": 2}), 400)
    assert e["param"] == "best_of"


def test_error_messages_have_no_stray_suffix(http):
    for raw in (b"[1, 2]", b'"text"', b"null"):
        e = err(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
        assert e["message"].startswith("request body: ") and "; expected a JSON object" not in e["message"]


def test_body_limit_by_length_and_by_stream(http, engine):
    e = err(http.post("/v1/completions", json={"prompt": "x" * 5000}), 413)
    assert "4096" in e["message"]

    def chunks():
        for _ in range(10):
            yield b" " * 1000
    e = err(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert engine.tokenizer.calls == 0


def test_overlong_text_refused_before_tokenizing(http, engine):
    # 64 tokens max, at most 4 characters a token: 300 characters cannot fit
    e = err(http.post("/v1/completions", json={"prompt": "y" * 300}), 400)
    assert e["code"] == "context_length_exceeded" and engine.tokenizer.calls == 0
    e = err(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 300}]}), 400)
    assert e["code"] == "context_length_exceeded"
    assert http.post("/v1/completions", json={"prompt": "y" * 20, "max_tokens": 3}).status_code == 200


def test_bearer_scheme_any_case():
    with TestClient(build_app(FakeEngine(), ["fake"], api_key="k1")) as c:
        body = {"prompt": "hi", "max_tokens": 2}
        for auth in ("Bearer k1", "bearer k1", "BEARER k1"):
            assert c.post("/v1/completions", json=body, headers={"Authorization": auth}).status_code == 200
        for auth in ("Bearer k2", "Basic k1", "k1", "bearer"):
            err(c.post("/v1/completions", json=body, headers={"Authorization": auth}), 401)


def test_openapi_and_docs_served(http):
    schema = http.get("/openapi.json").json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/CompletionRequest")
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "prompt_logprobs", "best_of"} <= set(props)
    assert http.get("/docs").status_code == 200


def test_tokenizing_a_long_prompt_leaves_the_loop_free(engine):
    """/health answers while a long prompt is being tokenized (on a worker thread)."""
    import asyncio
    import threading

    import httpx

    entered, release = threading.Event(), threading.Event()
    released_by_health: list[bool] = []
    inner_encode = engine.tokenizer.encode

    def slow_encode(text, add_special_tokens=True):
        if len(text) > 3000:
            entered.set()
            # on the event loop this would block /health until it timed out
            released_by_health.append(release.wait(5))
        return inner_encode(text, add_special_tokens)

    engine.tokenizer.encode = slow_encode
    engine.max_model_len = 4096
    app = build_app(engine, ["fake"])

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            job = asyncio.create_task(c.post("/v1/completions", json={"prompt": "z" * 3500, "max_tokens": 1}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            health = await asyncio.wait_for(c.get("/health"), 10)
            release.set()
            return health, await job

    try:
        health, done = asyncio.run(run())
    finally:
        release.set()
    assert health.status_code == 200 and released_by_health == [True]
    assert done.status_code == 200, done.text
