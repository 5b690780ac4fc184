"""The OpenAI protocol in-process, against a fake engine: validation, error bodies, SSE shapes.

Fast (no model, no subprocess); tests/server/test_server_e2e.py covers the real engine."""
from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from halserve.server.openai import build_app
from tests.server.fake_engine import FakeEngine


@pytest.fixture
def engine():
    return FakeEngine(max_model_len=64)


@pytest.fixture
def http(engine):
    with TestClient(build_app(engine, ["fake", "alias"]), raise_server_exceptions=False) as c:
        yield c


def sse_events(text: str) -> list:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def assert_error(r, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.01}, "top_p"),
    ({"prompt": "hi", "top_k": -2}, "top_k"),
    ({"prompt": "hi", "min_p": 2}, "min_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, None),
    ({"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": ""}, None),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [300]}, "prompt"),  # token id outside the vocabulary
    ({}, "prompt"),
    ({"prompt": "x" * 70}, "prompt"),  # longer than max_model_len (64)
    ({"prompt": "hi", "max_tokens": 63}, "max_tokens"),  # prompt + max_tokens > max_model_len
    ({"prompt": "hi", "suffix": "x"}, None),
    ({"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),  # from SamplingParams.validate
])
def test_completion_validation(http, engine, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param)
    assert not engine.seen_params  # nothing reached the engine


@pytest.mark.parametrize("body", [b"{bad json", b"", b"[1, 2]", b'"str"', b"null", b'{"prompt": "a",}'])
def test_malformed_body(http, body):
    err = assert_error(http.post("/v1/completions", content=body,
                                 headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"


def test_json_without_content_type_is_accepted(http):
    r = http.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -5}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, None),
    ({"messages": [{"role": "user", "content": "x" * 80}]}, "messages"),
])
def test_chat_validation(http, body, param):
    assert_error(http.post("/v1/chat/completions", json=body), 400, param)


def test_unknown_model_404(http):
    assert_error(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model",
                 "model_not_found")
    assert_error(http.get("/v1/models/gpt-4"), 404, "model")
    assert http.post("/v1/completions", json={"model": "alias", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_api_key(engine):
    with TestClient(build_app(engine, ["fake"], api_key="sekret")) as c:
        assert_error(c.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        # a bad key wins over a bad body: nothing about the request leaks before auth
        assert_error(c.post("/v1/completions", content=b"{bad"), 401)
        assert_error(c.post("/tokenize", json={"prompt": "x"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_engine_errors(http, engine):
    async def broken(*a, **k):
        raise RuntimeError("kaboom in the engine")
        yield  # pragma: no cover

    engine.generate = broken
    err = assert_error(http.post("/v1/completions", json={"prompt": "hi"}), 500)
    assert err["type"] == "server_error" and "kaboom" not in err["message"]

    async def rejects(*a, **k):
        raise ValueError("the prompt has 5 tokens but the KV cache holds only 4")
        yield  # pragma: no cover

    engine.generate = rejects
    assert "KV cache" in assert_error(http.post("/v1/completions", json={"prompt": "hi"}), 400)["message"]
    assert "KV cache" in assert_error(http.post("/v1/completions", json={"prompt": "hi", "stream": True}),
                                      400)["message"]


def test_health_reports_dead_engine(http, engine):
    assert http.get("/health").status_code == 200
    engine.is_running = False
    assert_error(http.get("/health"), 503)


# ---- responses --------------------------------------------------------------------------------

def test_completion_shapes(http, engine):
    r = http.post("/v1/completions", json={"prompt": [[104, 105], [104, 105]], "max_tokens": 3, "n": 2}).json()
    assert r["object"] == "text_completion" and r["model"] == "fake" and r["id"].startswith("cmpl-")
    assert http.post("/v1/completions", json={"prompt": ["hi", "yo"], "max_tokens": 1}).json()["choices"][1]["index"] == 1
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == ["abc", "bcd", "abc", "bcd"]
    assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    p = engine.seen_params[0]
    assert (p.n, p.max_tokens) == (2, 3)

    echo = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "echo": True}).json()
    assert echo["choices"][0]["text"] == "hiab"


def test_sampling_fields_reach_the_engine(http, engine):
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0.5, "top_p": 0.5, "top_k": 7, "min_p": 0.1,
            "seed": 11, "presence_penalty": 0.2, "frequency_penalty": 0.3, "repetition_penalty": 1.1,
            "stop": "zz", "logit_bias": {"5": 2.0}, "ignore_eos": True, "logprobs": 2}
    assert http.post("/v1/completions", json=body).status_code == 200
    p = engine.seen_params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 0.5, 7, 0.1, 11)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.2, 0.3, 1.1)
    assert p.stop == ["zz"] and p.logit_bias == {5: 2.0} and p.ignore_eos and p.logprobs == 2
    http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                            "top_logprobs": 3, "max_completion_tokens": 4})
    p = engine.seen_params[-1]
    assert (p.logprobs, p.max_tokens) == (3, 4)
    http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert engine.seen_params[-1].max_tokens == 64 - len("<user>x<assistant>")  # up to the context


def test_chat_stream_shape(http):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == ev[0]["id"] for e in ev)
    # role first, for each choice
    assert [e["choices"][0]["delta"] for e in ev[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [e["choices"][0]["index"] for e in ev[:2]] == [0, 1]
    body = [e for e in ev[2:] if e["choices"]]
    for i, want in ((0, "abc"), (1, "bcd")):
        mine = [e["choices"][0] for e in body if e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == want
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
    assert all(e["usage"] is None for e in ev[:-1])
    assert ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] == 6


def test_completion_stream_without_usage(http):
    ev = sse_events(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in ev) == "ab"
    assert all("usage" not in e for e in ev)


def test_stream_holds_back_partial_stop_string(http):
    # the fake emits a, b, c, d...; 'cdX' never completes, so 'cd' must be held back only while
    # it could still become the stop string, then released
    ev = sse_events(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True,
                                                       "stop": ["cdX"]}).text)
    texts = [e["choices"][0]["text"] for e in ev]
    assert "".join(texts) == "abcde"
    ev = sse_events(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stream": True,
                                                       "stop": ["cd"]}).text)
    assert "".join(e["choices"][0]["text"] for e in ev) == "ab"
    assert ev[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_logprobs_shape(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                "logprobs": True, "top_logprobs": 1}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["a", "b"]
    assert content[0]["bytes"] == [97] and content[0]["top_logprobs"][0]["token"] == "b"


def test_openai_client_against_fake(http):
    c = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    assert [m.id for m in c.models.list().data] == ["fake", "alias"]
    r = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content == "ab" and r.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="fake", prompt="hi", temperature=-1)


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "hi", "return_token_strs": True}).json()
    assert r == {"count": 2, "max_model_len": 64, "tokens": [104, 105], "token_strs": ["h", "i"]}
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert r["count"] == len("<user>x<assistant>")
    assert http.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert_error(http.post("/tokenize", json={}), 400)
    assert_error(http.post("/detokenize", json={"tokens": [999]}), 400, "tokens")


def test_metrics_and_version(http):
    http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    text = http.get("/metrics").text
    assert 'halserve:request_success_total{finished_reason="length",model_name="fake"} 1.0' in text
    assert "halserve:time_to_first_token_seconds_count" in text
    assert "halserve:inter_token_latency_seconds_count{model_name=\"fake\"} 2.0" in text
    assert http.get("/version").json()["version"]


def test_offload_metrics_when_configured(engine):
    base = engine.get_metrics

    def with_offload():
        return base() | {"offload": {"host": {"hits": 3, "misses": 1, "used_bytes": 4096, "pinned": 6},
                                     "disk": {"hits": 2, "misses": 5, "used_bytes": 8192, "skipped_writes": 7},
                                     "bytes_to_device": 100, "bytes_from_device": 200, "load_seconds": 0.5,
                                     "load_count": 4, "bad_files": 1, "load_jobs_done": 2, "load_job_seconds": 0.5}}

    engine.get_metrics = with_offload
    with TestClient(build_app(engine, ["fake"])) as c:
        text = c.get("/metrics").text
    assert 'halserve:kv_offload_hits_total{model_name="fake",tier="host"} 3.0' in text
    assert 'halserve:kv_offload_used_bytes{model_name="fake",tier="disk"} 8192.0' in text
    assert 'halserve:kv_offload_bytes_total{direction="to_device",model_name="fake"} 100.0' in text
    assert 'halserve:kv_offload_loads_total{model_name="fake"} 4.0' in text
    assert 'halserve:kv_offload_load_jobs_total{model_name="fake"} 2.0' in text
    assert 'halserve:kv_offload_load_job_seconds_total{model_name="fake"} 0.5' in text
    assert 'halserve:kv_offload_pinned_blocks{model_name="fake"} 6.0' in text
    assert 'halserve:kv_offload_skipped_writes_total{model_name="fake"} 7.0' in text
