"""Fixtures for the server tests: a real ``halserve serve`` subprocess on a free port."""
from __future__ import annotations

import pytest

from tests.server.server_proc import API_KEY, MODEL_NAME, ServerProcess


@pytest.fixture(scope="module")
def tiny_model(checkpoint):
    # 4,096 positions: room for a request that is still generating seconds later (the disconnect test)
    return checkpoint("llama", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The tiny Llama checkpoint served on a free port, with an API key; stopped by SIGTERM,
    which must end the process cleanly (exit status 0)."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    srv = ServerProcess([str(tiny_model), "--host", "127.0.0.1", "--port", "0", "--dtype", "float32",
                         "--served-model-name", MODEL_NAME, "--api-key", API_KEY, "--max-num-seqs", "64",
                         "--disable-uvicorn-access-log"], log)
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server did not shut down cleanly (exit {rc}):\n{srv.log()}"
    assert "shut down cleanly" in srv.log()
    assert "Traceback" not in srv.log(), srv.log()
