"""A short soak and a disconnect storm against a real `halserve serve` on loopback: streaming
clients with disconnects and malformed requests injected, then every figure checked (the long
run is `halserve bench soak`; its figures are in docs/reliability.md)."""
from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import pytest

from halserve.bench.soak import SoakReport, _metrics, _stream_once, rss_mb, soak, start_server

SOAK_SECONDS = 15
# what the server may grow from its idle baseline after the warm-up to idle after the run
RSS_GROWTH_MB = 24
# oneDNN's GEMM primitive caches fill as new batch/prefill sizes come (a few hundred KB a
# shape, bounded by their capacity: test_memory.py checks the default's bound). Small here so
# they are full within the warm-up, and what the bound judges is everything else.
SMALL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "LRU_CACHE_CAPACITY": "32"}


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    log = Path(tmp_path_factory.mktemp("soak")) / "serve.log"
    # bfloat16: the GEMM path a CPU server takes (oneDNN's), as the long soak's demo model
    proc, url = start_server(str(checkpoint("qwen3")), ["--dtype", "bfloat16", "--max-num-seqs", "16",
                                                        "--max-request-body-mb", "1"], log, env=SMALL_CACHES)
    yield proc, url, log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_short_soak(served):
    proc, url, _ = served
    r = asyncio.run(soak(url, clients=8, seconds=SOAK_SECONDS, max_tokens=16, pid=proc.pid,
                         disconnect_every=0.3, bad_every=0.1, body_limit_bytes=1 << 20, warmup_seconds=5,
                         progress=lambda s: None))
    assert r.requests > 20 and r.completed == r.requests, r
    assert r.errors_by_code == {} and r.truncated_streams == 0, r
    assert r.disconnects_injected > 5 and r.bad_inputs_tried > 20 and r.bad_inputs_5xx == 0, r
    assert r.metrics_back_to_zero, r.final_metrics
    # idle to idle: the heap trimmed when the engine ran out of work, the KV resident from the start
    print(f"RSS start {r.rss_mb_start}, idle after the warm-up {r.rss_mb_baseline}, peak {r.rss_mb_peak}, "
          f"idle after {r.rss_mb_after} MB")
    assert r.rss_mb_baseline is not None and r.rss_mb_after - r.rss_mb_baseline < RSS_GROWTH_MB, r


def test_disconnect_storm_frees_the_kv(served):
    import httpx

    proc, url, _ = served

    async def run():
        report = SoakReport("", "", 0, 0)
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as c:
            await asyncio.gather(*(_stream_once(c, random.Random(i), 200, report, disconnect=True)
                                   for i in range(48)))
            for _ in range(100):
                m = await _metrics(c)
                if m["halserve:num_requests_running"] == 0 and m["halserve:kv_cache_usage_perc"] == 0:
                    break
                await asyncio.sleep(0.1)
            return report, m

    report, m = asyncio.run(run())
    assert report.disconnects_injected == 48
    assert m["halserve:num_requests_running"] == 0 and m["halserve:num_requests_waiting"] == 0
    assert m["halserve:kv_cache_usage_perc"] == 0
    assert rss_mb(proc.pid) is not None
