"""Prometheus metrics for ``GET /metrics``, with vLLM's names under a ``halserve:`` prefix.

Engine state (running/waiting requests, KV usage, prefix-cache and token counters) is read
from ``engine.get_metrics()`` at scrape time by a custom collector, so the engine thread
never touches prometheus. Latencies are measured here, in the server, from the moment a
request is parsed: what a client sees, queueing included.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0)

# engine.get_metrics() key -> (metric name, kind, help)
_ENGINE_METRICS = (
    ("num_requests_running", "halserve:num_requests_running", "gauge",
     "Requests in the running batch."),
    ("num_requests_waiting", "halserve:num_requests_waiting", "gauge",
     "Requests waiting to be scheduled."),
    ("kv_cache_usage", "halserve:kv_cache_usage_perc", "gauge",
     "Fraction of KV cache blocks held by live requests (0..1; 1 = full)."),
    ("prefix_cache_queries", "halserve:prefix_cache_queries", "counter",
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "halserve:prefix_cache_hits", "counter",
     "Prompt tokens served from the prefix cache."),
    ("prompt_tokens_total", "halserve:prompt_tokens", "counter", "Prompt tokens admitted."),
    ("generation_tokens_total", "halserve:generation_tokens", "counter", "Tokens generated."),
    ("num_preemptions_total", "halserve:num_preemptions", "counter", "Sequences preempted."),
)


class _EngineCollector:
    def __init__(self, get_metrics: Callable[[], dict], model_name: str):
        self._get = get_metrics
        self._model = model_name

    def collect(self):
        try:
            values = self._get() or {}
        except Exception:  # a scrape must not fail because the engine is gone
            values = {}
        for key, name, kind, help_ in _ENGINE_METRICS:
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            fam = cls(name, help_, labels=["model_name"])
            fam.add_metric([self._model], float(values.get(key, 0) or 0))
            yield fam
        offload = values.get("offload")
        if isinstance(offload, dict):
            yield from self._offload(offload)
        if "spec_decode_num_drafts" in values:
            yield from self._spec(values)

    def _spec(self, v: dict):
        """Speculative decoding (engine/spec), when configured; vLLM's spec_decode names."""
        for key, name, kind, help_ in (
                ("spec_decode_num_drafts", "halserve:spec_decode_num_drafts", "counter",
                 "Verify steps of sequences that had a draft."),
                ("spec_decode_num_draft_tokens", "halserve:spec_decode_num_draft_tokens", "counter",
                 "Draft tokens proposed and verified."),
                ("spec_decode_num_accepted_tokens", "halserve:spec_decode_num_accepted_tokens", "counter",
                 "Draft tokens accepted."),
                ("spec_decode_acceptance_rate", "halserve:spec_decode_acceptance_rate", "gauge",
                 "Accepted / drafted tokens since start."),
                ("spec_decode_mean_accepted_length", "halserve:spec_decode_mean_accepted_length", "gauge",
                 "Tokens a verify step emits on average (accepted drafts + 1).")):
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, help_, labels=["model_name"])
            fam.add_metric([self._model], float(v.get(key, 0) or 0))
            yield fam

    def _offload(self, o: dict):
        """KV offload tiers (engine/offload.py), when configured."""
        m = self._model
        tiers = [t for t in ("host", "disk") if isinstance(o.get(t), dict)]
        for key, name, kind, help_ in (
                ("hits", "halserve:kv_offload_hits", "counter", "KV blocks found in an offload tier."),
                ("misses", "halserve:kv_offload_misses", "counter", "KV block lookups an offload tier missed."),
                ("used_bytes", "halserve:kv_offload_used_bytes", "gauge", "Bytes held by an offload tier.")):
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, help_, labels=["model_name", "tier"])
            for t in tiers:
                fam.add_metric([m, t], float(o[t].get(key, 0) or 0))
            yield fam
        fam = CounterMetricFamily("halserve:kv_offload_bytes", "KV bytes moved between the device and the tiers.",
                                  labels=["model_name", "direction"])
        fam.add_metric([m, "to_device"], float(o.get("bytes_to_device", 0) or 0))
        fam.add_metric([m, "from_device"], float(o.get("bytes_from_device", 0) or 0))
        yield fam
        for key, name, help_ in (
                ("load_seconds", "halserve:kv_offload_load_seconds", "Seconds spent copying KV blocks in."),
                ("load_count", "halserve:kv_offload_loads", "KV block copy-ins (mean latency = seconds / loads)."),
                ("load_job_seconds", "halserve:kv_offload_load_job_seconds",
                 "Seconds from a disk load job's start to its blocks being on the device."),
                ("load_jobs_done", "halserve:kv_offload_load_jobs", "Disk load jobs finished."),
                ("bad_files", "halserve:kv_offload_bad_files", "Offload files rejected (corrupt or foreign).")):
            fam = CounterMetricFamily(name, help_, labels=["model_name"])
            fam.add_metric([m], float(o.get(key, 0) or 0))
            yield fam
        host, disk = o.get("host"), o.get("disk")
        if isinstance(host, dict):
            fam = GaugeMetricFamily("halserve:kv_offload_pinned_blocks",
                                    "Host-tier blocks held by a copy in flight or a disk write.", labels=["model_name"])
            fam.add_metric([m], float(host.get("pinned", 0) or 0))
            yield fam
        if isinstance(disk, dict):
            fam = CounterMetricFamily("halserve:kv_offload_skipped_writes",
                                      "Blocks not written to disk because the writer was too far behind.",
                                      labels=["model_name"])
            fam.add_metric([m], float(disk.get("skipped_writes", 0) or 0))
            yield fam


class ServerMetrics:
    """One registry per app, so several apps (tests) can live in one process."""

    def __init__(self, get_engine_metrics: Callable[[], dict], model_name: str):
        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        self.registry.register(_EngineCollector(get_engine_metrics, model_name))
        labels = ["model_name"]
        kw = dict(labelnames=labels, registry=self.registry)
        self.ttft = Histogram("halserve:time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.",
                              buckets=TTFT_BUCKETS, **kw).labels(model_name)
        self.itl = Histogram("halserve:inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request.",
                             buckets=ITL_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram("halserve:e2e_request_latency_seconds",
                             "Time from request arrival to its last token.",
                             buckets=E2E_BUCKETS, **kw).labels(model_name)
        self.finished = Counter("halserve:request_success", "Finished requests by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)

    def track(self, arrival: float | None = None) -> "RequestTracker":
        """A tracker for one engine request; ``arrival`` is a ``time.perf_counter()`` value."""
        return RequestTracker(self, arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Latency bookkeeping for one engine request (one prompt, its n outputs)."""

    __slots__ = ("m", "arrival", "last", "num_tokens", "done")

    def __init__(self, m: ServerMetrics, arrival: float | None = None):
        self.m = m
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.last: float | None = None
        self.num_tokens = 0
        self.done = False

    def on_output(self, out: Any) -> None:
        """``out``: a delta output (its token ids are the new ones)."""
        new = sum(len(c.token_ids) for c in out.outputs)
        n = self.num_tokens + new
        if new <= 0:
            return
        t = time.perf_counter()
        if self.last is None:
            self.m.ttft.observe(t - self.arrival)
            new -= 1
        if new > 0 and self.last is not None:
            # tokens that arrive together in one step share the gap
            gap = (t - self.last) / new
            for _ in range(new):
                self.m.itl.observe(gap)
        self.last, self.num_tokens = t, n
        if out.finished:
            self.finish([c.finish_reason or "stop" for c in out.outputs])

    def finish(self, reasons: list[str]) -> None:
        if self.done:
            return
        self.done = True
        self.m.e2e.observe(time.perf_counter() - self.arrival)
        for r in reasons:
            self.m.finished.labels(self.m.model_name, r).inc()

    def abort(self) -> None:
        self.finish(["abort"])
