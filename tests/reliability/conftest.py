"""A real engine (tiny random Qwen3) behind the real app, in process: the reliability tests
talk HTTP to it through httpx's ASGI transport (loopback only, nothing listens)."""
from __future__ import annotations

import pytest

MODEL = "tiny"


@pytest.fixture(scope="session")
def engine(checkpoint):
    from halserve import AsyncLLM

    llm = AsyncLLM(str(checkpoint("qwen3")), dtype="float32", max_num_seqs=16, enforce_eager=True)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def app(engine):
    from halserve.server.openai import build_app

    return build_app(engine, [MODEL], max_body_bytes=1 << 20)


def assert_openai_error(resp) -> dict:
    body = resp.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    return err
