"""``halserve bench soak``: N concurrent streaming clients for T minutes against a server on
loopback, with mid-stream disconnects and malformed requests injected meanwhile.

Counts requests, errors by status code, truncated streams (no finish_reason or no [DONE]),
faults injected and bad inputs tried, and waits for the server's metrics to return to zero (no
request running or waiting, KV usage 0). Memory is judged idle to idle: after the warm-up the
load pauses until the server is idle (its engine trims the heap then) and that RSS is the
baseline; the run's end is read the same way, once the last client has left.
Every loop is bounded in count and in time. With ``--model`` it starts its own
``halserve serve`` on 127.0.0.1 and stops it; with ``--url`` it talks to a running one
(loopback only)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

# bodies that must each get a 4xx with an OpenAI error body, never a 5xx
BAD_INPUTS: list[tuple[str, object]] = [
    ("logit_bias key past the vocabulary", {"prompt": "hi", "logit_bias": {"99999999": 5}}),
    ("stop id past the vocabulary", {"prompt": "hi", "stop_token_ids": [99999999]}),
    ("max_tokens as a string", {"prompt": "hi", "max_tokens": "10"}),
    ("stream as a string", {"prompt": "hi", "stream": "yes"}),
    ("n as a string", {"prompt": "hi", "n": "2"}),
    ("guided_json", {"prompt": "hi", "guided_json": {"type": "object"}}),
    ("unknown field", {"prompt": "hi", "frobnicate": True}),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -1}),
    ("NaN temperature", b'{"prompt": "hi", "temperature": NaN}'),
    ("token id out of range", {"prompt": [99999999]}),
    ("empty prompt", {"prompt": "", "add_special_tokens": False}),
    ("empty token list", {"prompt": []}),
    ("huge n", {"prompt": "hi", "n": 100000}),
    ("prompt far past the context", {"prompt": "word " * 200_000}),
    ("malformed JSON", b'{"prompt": "hi",'),
    ("not an object", b"[1, 2, 3]"),
    ("body over the limit", None),  # built at run time: limit + 1 bytes
]


@dataclass
class SoakReport:
    machine: str
    date: str
    clients: int
    seconds: float
    requests: int = 0
    completed: int = 0
    tokens: int = 0
    errors_by_code: dict = field(default_factory=dict)
    truncated_streams: int = 0
    disconnects_injected: int = 0
    bad_inputs_tried: int = 0
    bad_inputs_by_code: dict = field(default_factory=dict)
    bad_inputs_5xx: int = 0
    rss_mb_start: float | None = None  # after three single requests
    rss_mb_after_warmup: float | None = None  # after warmup_seconds of the full load
    rss_mb_baseline: float | None = None  # idle, right after the warm-up (the load paused)
    rss_mb_peak: float | None = None  # largest sample under load
    rss_mb_after: float | None = None  # idle, after the run
    rss_samples: list = field(default_factory=list)  # (seconds into the run, MB)
    metrics_back_to_zero: bool | None = None
    final_metrics: dict = field(default_factory=dict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--url", default=None, help="a running server on loopback (e.g. http://127.0.0.1:8000)")
    g.add_argument("--model", default=None, help="start `halserve serve MODEL` on 127.0.0.1 for the run")
    p.add_argument("--serve-args", default="", help="extra flags for the server started with --model")
    p.add_argument("--pid", type=int, default=None, help="server pid for RSS (with --url)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument("--minutes", type=float, default=2.0, help="soak duration")
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens a client asks for")
    p.add_argument("--disconnect-every", type=float, default=1.0, help="seconds between mid-stream disconnects")
    p.add_argument("--bad-every", type=float, default=0.5, help="seconds between malformed requests")
    p.add_argument("--body-limit-mb", type=float, default=16.0, help="the server's --max-request-body-mb")
    p.add_argument("--warmup-minutes", type=float, default=None,
                   help="full load before RSS is taken as the baseline (default: a fifth of --minutes)")
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                   help="fail if the server's idle RSS after the run exceeds its idle RSS after the warm-up by more")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        return round(int(m.group(1)) / 1024, 1) if m else None
    except OSError:
        return None


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--url {url!r} is not on loopback; the soak only talks to 127.0.0.1/localhost/::1")


async def _metrics(client) -> dict[str, float]:
    r = await client.get("/metrics")
    out = {}
    for line in r.text.splitlines():
        m = re.match(r"(halserve:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def _stream_once(client, rng: random.Random, max_tokens: int, report: SoakReport,
                       disconnect: bool = False) -> None:
    n_prompt = rng.randint(1, 48)
    body = {"prompt": [rng.randint(5, 250) for _ in range(n_prompt)], "stream": True,
            "max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0.0, 0.8]),
            "seed": rng.randint(0, 1 << 30), "ignore_eos": rng.random() < 0.5}
    if not disconnect:
        report.requests += 1
    finish, done, tokens = None, False, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            report.errors_by_code[str(r.status_code)] = report.errors_by_code.get(str(r.status_code), 0) + 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                code = str(chunk["error"].get("code"))
                report.errors_by_code["stream:" + code] = report.errors_by_code.get("stream:" + code, 0) + 1
                continue
            ch = chunk["choices"][0]
            tokens += 1
            finish = ch.get("finish_reason") or finish
            if disconnect:
                report.disconnects_injected += 1
                return  # leaving mid-stream: the server must free its KV
    if finish is None or not done:
        report.truncated_streams += 1
    else:
        report.completed += 1
        report.tokens += tokens


async def _bad_once(client, i: int, limit_bytes: int, report: SoakReport) -> None:
    name, body = BAD_INPUTS[i % len(BAD_INPUTS)]
    if body is None:
        raw = b'{"prompt": "' + b"x" * (limit_bytes + 1) + b'"}'
    elif isinstance(body, bytes):
        raw = body
    else:
        raw = json.dumps(body).encode()
    r = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    report.bad_inputs_tried += 1
    key = f"{r.status_code}"
    report.bad_inputs_by_code[key] = report.bad_inputs_by_code.get(key, 0) + 1
    ok_body = False
    try:
        err = r.json()["error"]
        ok_body = isinstance(err.get("message"), str)
    except Exception:
        pass
    if r.status_code >= 500 or not 400 <= r.status_code < 500 or not ok_body:
        report.bad_inputs_5xx += 1
        print(f"soak: bad input {name!r} got {r.status_code}: {r.text[:200]}", file=sys.stderr)


async def soak(url: str, clients: int, seconds: float, *, max_tokens: int = 32, pid: int | None = None,
               disconnect_every: float = 1.0, bad_every: float = 0.5, body_limit_bytes: int = 16 << 20,
               seed: int = 0, warmup_seconds: float | None = None, progress=print) -> SoakReport:
    import httpx

    _check_loopback(url)
    report = SoakReport(machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs "
                                f"{platform.processor() or ''}".strip(),
                        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        clients=clients, seconds=seconds)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        warm = SoakReport(report.machine, report.date, clients, 0)
        for i in range(3):
            await _stream_once(client, random.Random(seed + i), max_tokens, warm)
        report.rss_mb_start = rss_mb(pid)
        # the working set of full batches (activations, allocator arenas, KV pages first
        # touched) grows during the first part of the load: RSS is judged after it
        warmup = seconds / 5 if warmup_seconds is None else warmup_seconds
        deadline = time.monotonic() + seconds
        max_per_client = 100_000  # a bound on count as well as on time
        resume = asyncio.Event()  # cleared while the load pauses for the idle baseline
        resume.set()

        async def client_loop(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            for _ in range(max_per_client):
                await resume.wait()
                if time.monotonic() >= deadline:
                    return
                try:
                    await _stream_once(client, rng, max_tokens, report)
                except httpx.HTTPError as e:
                    name = "transport:" + type(e).__name__
                    report.errors_by_code[name] = report.errors_by_code.get(name, 0) + 1

        async def faults() -> None:
            rng = random.Random(seed + 7)
            next_disc, next_bad, i = 0.0, 0.0, 0
            while time.monotonic() < deadline and i < 100_000:
                await resume.wait()
                now = time.monotonic()
                try:
                    if now >= next_disc:
                        await _stream_once(client, rng, max_tokens, report, disconnect=True)
                        next_disc = now + disconnect_every
                    if now >= next_bad:
                        await _bad_once(client, i, body_limit_bytes, report)
                        next_bad, i = now + bad_every, i + 1
                except httpx.HTTPError as e:
                    name = "fault-transport:" + type(e).__name__
                    report.errors_by_code[name] = report.errors_by_code.get(name, 0) + 1
                await asyncio.sleep(0.05)

        async def ticker() -> None:
            nonlocal deadline
            t0 = time.monotonic()
            while time.monotonic() < deadline:
                await asyncio.sleep(min(10.0, max(0.1, deadline - time.monotonic()),
                                        max(0.1, t0 + warmup - time.monotonic())
                                        if report.rss_mb_after_warmup is None else 10.0))
                now_rss = rss_mb(pid)
                report.rss_samples.append((round(time.monotonic() - t0, 1), now_rss))
                if now_rss is not None:
                    report.rss_mb_peak = max(report.rss_mb_peak or 0.0, now_rss)
                if report.rss_mb_after_warmup is None and time.monotonic() - t0 >= warmup:
                    report.rss_mb_after_warmup = now_rss
                    resume.clear()
                    paused = time.monotonic()
                    await _wait_idle(client)
                    report.rss_mb_baseline = rss_mb(pid)
                    deadline += time.monotonic() - paused  # the pause is not load time
                    resume.set()
                    progress(f"soak: idle baseline after the warm-up {report.rss_mb_baseline} MB "
                             f"(paused {time.monotonic() - paused:.1f} s)")
                progress(f"soak: {time.monotonic() - t0:5.0f}s  requests {report.requests}  completed "
                         f"{report.completed}  errors {sum(report.errors_by_code.values())}  truncated "
                         f"{report.truncated_streams}  disconnects {report.disconnects_injected}  bad inputs "
                         f"{report.bad_inputs_tried}  rss {rss_mb(pid)} MB")

        await asyncio.gather(*(client_loop(k) for k in range(clients)), faults(), ticker())
        # metrics must come back to zero once the clients are gone
        m = await _wait_idle(client)
        report.final_metrics = {k: v for k, v in m.items() if "running" in k or "waiting" in k or "usage" in k}
        report.metrics_back_to_zero = all(v == 0 for v in report.final_metrics.values()) and bool(report.final_metrics)
        report.rss_mb_after = rss_mb(pid)
    return report


async def _wait_idle(client, settle: float = 3.0) -> dict:
    """Until nothing runs or waits and the KV is free (at most 10 s), then ``settle`` s more:
    the engine thread gives freed heap pages back once out of work. Returns the last metrics."""
    m: dict = {}
    for _ in range(100):
        m = await _metrics(client)
        if m.get("halserve:num_requests_running", 1) == 0 and m.get("halserve:num_requests_waiting", 1) == 0 \
                and m.get("halserve:kv_cache_usage_perc", 1) == 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(settle)
    return m


def start_server(model: str, extra: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``halserve serve MODEL`` on 127.0.0.1, a free port; returns (process, base URL).
    ``env``: variables added to this process's environment for the server."""
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "halserve.cli", "serve", model, "--host", "127.0.0.1",
                             "--port", "0", "--disable-uvicorn-access-log", *extra],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = re.search(r"ready on (http://\S+?:\d+)", log_path.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready within 300 s")


def main(args: argparse.Namespace) -> int:
    import shlex
    import signal
    import tempfile

    if args.clients < 1 or not args.minutes > 0:
        raise ValueError(f"--clients {args.clients} / --minutes {args.minutes}: both must be positive")
    proc, pid, url = None, args.pid, args.url or "http://127.0.0.1:8000"
    if args.model:
        log = Path(tempfile.mkdtemp(prefix="halserve-soak-")) / "serve.log"
        print(f"soak: starting halserve serve {args.model} (log {log})", flush=True)
        proc, url = start_server(args.model, shlex.split(args.serve_args), log)
        pid = proc.pid
    try:
        report = asyncio.run(soak(url, args.clients, args.minutes * 60, max_tokens=args.max_tokens, pid=pid,
                                  disconnect_every=args.disconnect_every, bad_every=args.bad_every,
                                  body_limit_bytes=int(args.body_limit_mb * (1 << 20)), seed=args.seed,
                                  warmup_seconds=None if args.warmup_minutes is None else args.warmup_minutes * 60,
                                  progress=lambda s: print(s, flush=True)))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    d = asdict(report)
    print(json.dumps(d, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=2))
    bad = sum(report.errors_by_code.values()) + report.truncated_streams + report.bad_inputs_5xx
    grew = None
    if report.rss_mb_after is not None and report.rss_mb_baseline is not None:
        grew = report.rss_mb_after - report.rss_mb_baseline
        print(f"soak: RSS idle after the warm-up {report.rss_mb_baseline} MB, idle after the run "
              f"{report.rss_mb_after} MB ({grew:+.1f} MB; limit {args.max_rss_growth_mb:+.0f})", flush=True)
    rss_ok = grew is None or grew <= args.max_rss_growth_mb
    return 0 if bad == 0 and report.metrics_back_to_zero and rss_ok else 1
