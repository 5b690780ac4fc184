"""`halserve serve` with no MODEL serves the demo model that ships in the package; Ctrl-C
(SIGINT) stops it cleanly."""
from __future__ import annotations

import signal

import httpx
import openai
import pytest

from halserve.server.cli import DEMO_MODEL_NAME, demo_model_path
from tests.server.server_proc import ServerProcess

pytestmark = pytest.mark.skipif(not (demo_model_path() / "config.json").is_file(),
                                reason="the demo model is not in this checkout yet")


def test_serve_without_model_uses_demo(tmp_path):
    srv = ServerProcess(["--host", "127.0.0.1", "--port", "0", "--disable-uvicorn-access-log"], tmp_path / "log")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == [DEMO_MODEL_NAME]
        r = c.chat.completions.create(model=DEMO_MODEL_NAME, messages=[{"role": "user", "content": "What is `os`?"}],
                                      max_tokens=8, temperature=0)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        rc = srv.stop(signal.SIGINT)
    assert rc == 0, srv.log()
    assert "shut down cleanly" in srv.log()
