"""``halserve bench serve``: stream requests at a running OpenAI-compatible server and report
TTFT, TPOT, ITL (mean, p50, p99) and throughput.

Prompts are ``--input-len`` random token ids (drawn from ids the server's tokenizer really
produces, so any vocabulary works) sent to /v1/completions as token-id prompts with
``ignore_eos`` so every request generates exactly ``--output-len`` tokens; ``--endpoint chat``
sends the same tokens as text to /v1/chat/completions instead. ``--concurrency`` requests are
in flight at a time until ``--num-prompts`` have finished. Works against vLLM too.

- TTFT: request sent -> first non-empty text chunk.
- ITL: gaps between consecutive non-empty text chunks.
- TPOT: (latency - TTFT) / (output tokens - 1), per request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field

SEED_TEXT = ("The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly. "
             "def main(argv): return sum(int(x) for x in argv if x.isdigit()) # 0123456789 {}[]()")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--num-prompts", type=int, default=64, help="requests in all")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed requests sent first")
    p.add_argument("--api-key", default=os.environ.get("HALSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")


@dataclass(slots=True)
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _server_info(client, args) -> tuple[str, int | None, list[int]]:
    """(model name, max_model_len, a pool of valid token ids)."""
    r = await client.get(f"{args.url}/v1/models")
    r.raise_for_status()
    models = r.json()["data"]
    if not models:
        raise RuntimeError(f"{args.url}/v1/models lists no model")
    card = next((m for m in models if m["id"] == args.model), None) if args.model else models[0]
    if card is None:
        raise RuntimeError(f"model {args.model!r} not served; the server has {[m['id'] for m in models]}")
    pool: list[int] = []
    r = await client.post(f"{args.url}/tokenize", json={"prompt": SEED_TEXT, "add_special_tokens": False})
    if r.status_code == 200:
        pool = sorted(set(r.json().get("tokens", [])))
    if len(pool) < 8:  # no tokenizer (or no /tokenize): small ids exist in every vocabulary
        pool = list(range(10, 100))
    return card["id"], card.get("max_model_len"), pool


def _body(args, model: str, prompt_ids: list[int], prompt_text: str | None) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0.0,
              "stream": True, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt_text}]}
    return "/v1/completions", {**common, "prompt": prompt_ids}


async def _one(client, url: str, body: dict, timeout: float) -> Result:
    res = Result()
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", str(obj["error"]))
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices", []):
                    text = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
        res.latency = time.perf_counter() - t0
        res.ok = last is not None
        if not res.ok:
            res.error = "no text streamed"
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _run(args) -> dict:
    try:
        import httpx
    except ImportError:
        raise RuntimeError("halserve bench serve needs httpx: pip install httpx") from None
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30.0) as client:
        model, max_len, pool = await _server_info(client, args)
        if max_len and args.input_len + args.output_len > max_len:
            raise ValueError(f"--input-len {args.input_len} + --output-len {args.output_len} exceeds the "
                             f"server's max_model_len {max_len}")
        rng = random.Random(args.seed)
        prompts = [[rng.choice(pool) for _ in range(args.input_len)] for _ in range(args.num_prompts + args.warmup)]
        texts: list[str | None] = [None] * len(prompts)
        if args.endpoint == "chat":
            for i, ids in enumerate(prompts):
                r = await client.post(f"{args.url}/detokenize", json={"tokens": ids})
                r.raise_for_status()
                texts[i] = r.json()["prompt"]
        bodies = [_body(args, model, ids, t) for ids, t in zip(prompts, texts)]

        for path, body in bodies[: args.warmup]:
            w = await _one(client, args.url + path, body, args.timeout)
            if not w.ok:
                raise RuntimeError(f"warm-up request failed: {w.error}")
        sem = asyncio.Semaphore(args.concurrency)

        async def limited(path, body):
            async with sem:
                return await _one(client, args.url + path, body, args.timeout)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(p, b) for p, b in bodies[args.warmup:]))
        duration = time.perf_counter() - t0
    return _summary(args, model, results, duration)


def _summary(args, model: str, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    lat = [r.latency for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def stats(xs):
        return {"mean_ms": statistics.fmean(xs) * 1e3 if xs else float("nan"),
                "p50_ms": percentile(xs, 50) * 1e3, "p99_ms": percentile(xs, 99) * 1e3}

    return {
        "url": args.url, "model": model, "endpoint": args.endpoint, "concurrency": args.concurrency,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (out_tokens + len(ok) * args.input_len) / duration if duration else 0.0,
        "ttft": stats(ttft), "tpot": stats(tpot), "itl": stats(itl), "e2e_latency": stats(lat),
        "host_load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _print(s: dict) -> None:
    w = 34
    print(f"{' Serving benchmark ':=^60}")
    rows = [("Server / model", f"{s['url']}  {s['model']}"), ("Endpoint", s["endpoint"]),
            ("Concurrency", s["concurrency"]), ("Input / output tokens", f"{s['input_len']} / {s['output_len']}"),
            ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Duration (s)", f"{s['duration_s']:.2f}"),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    for k, v in rows:
        print(f"{k:<{w}}{v}")
    for key, title in (("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
                       ("itl", "Inter-token latency"), ("e2e_latency", "End-to-end latency")):
        print(f"{' ' + title + ' ':-^60}")
        for stat in ("mean_ms", "p50_ms", "p99_ms"):
            label = stat.replace("_ms", "").replace("mean", "Mean").replace("p", "P", 1)
            print(f"{label + ' (ms)':<{w}}{s[key][stat]:.2f}")
    if s["errors"]:
        print("errors: " + "; ".join(s["errors"]))
    print("=" * 60)


def main(args: argparse.Namespace) -> int:
    for name in ("concurrency", "num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    try:
        summary = asyncio.run(_run(args))
    except OSError as e:
        raise _unreachable(args.url, e) from None
    except Exception as e:
        if type(e).__module__.startswith("httpx"):
            raise _unreachable(args.url, e) from None
        raise
    _print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


def _unreachable(url: str, e: Exception) -> Exception:
    from halserve.errors import HalserveError

    return HalserveError(f"cannot talk to {url} ({type(e).__name__}: {e}); is `halserve serve` running there?")
