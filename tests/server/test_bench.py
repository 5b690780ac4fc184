"""The serving benchmarks: `bench serve` against an in-thread server, and the 1.1B checkpoint writer."""
from __future__ import annotations

import argparse
import math
import socket
import threading
import time

import pytest

from halserve.bench import serve as bench_serve
from halserve.bench.startup import TINYLLAMA_SHAPE, llama_tensor_shapes, write_random_llama
from tests.server.fake_engine import FakeEngine


def test_tinyllama_shape_is_1_1b():
    n = sum(math.prod(s) for s in llama_tensor_shapes(**TINYLLAMA_SHAPE).values())
    assert 1.09e9 < n < 1.11e9


def test_random_llama_loads_in_halserve(tmp_path):
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=128, max_position_embeddings=64)
    path = write_random_llama(tmp_path / "ckpt", shape, num_shards=2)
    assert len(list(path.glob("model-*.safetensors"))) == 2
    from halserve import LLM, SamplingParams

    out = LLM(str(path)).generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_percentile():
    assert bench_serve.percentile([1, 2, 3, 4], 50) == 2.5
    assert bench_serve.percentile([5], 99) == 5


@pytest.fixture
def fake_server():
    import uvicorn

    from halserve.server.openai import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(FakeEngine(step_delay=0.002, max_model_len=256), ["fake"]),
                                           log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_serve(fake_server, endpoint, tmp_path, capsys):
    p = argparse.ArgumentParser()
    bench_serve.add_arguments(p)
    args = p.parse_args(["--url", fake_server, "--concurrency", "4", "--num-prompts", "8", "--input-len", "16",
                         "--output-len", "5", "--endpoint", endpoint, "--json", str(tmp_path / "r.json")])
    assert bench_serve.main(args) == 0
    out = capsys.readouterr().out
    assert "Time to first token" in out and "Inter-token latency" in out
    import json

    r = json.loads((tmp_path / "r.json").read_text())
    assert r["completed"] == 8 and r["failed"] == 0
    assert r["ttft"]["p50_ms"] > 0 and r["itl"]["p99_ms"] > 0 and r["output_throughput"] > 0
