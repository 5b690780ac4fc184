"""``halserve serve [MODEL]``: load a model and serve the OpenAI API with uvicorn.

Start-up is on the critical path of every deployment, so: the port is bound first (a busy
port fails in milliseconds, not after the model loads); the engine loads in a worker thread
while this thread imports the web stack; nothing is compiled; progress lines go to stderr
with the elapsed time, then one line naming the backend, its kernels and why it was chosen,
then ``ready on http://HOST:PORT``. SIGINT/SIGTERM stop accepting, let in-flight requests
finish (up to --shutdown-timeout seconds, then abort them) and exit with status 0.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

DEMO_MODEL_NAME = "halserve-demo"
_T0 = time.perf_counter()


def demo_model_path() -> Path:
    import halserve

    return Path(halserve.__file__).resolve().parent / "demo_model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from halserve.generate_cli import add_engine_arguments

    add_engine_arguments(p)  # MODEL and the engine flags, with vLLM's names
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on, 0..65535; 0 picks a free one")
    p.add_argument("--max-request-body-mb", type=_positive_float, default=16.0,
                   help="largest request body accepted, in MiB (default 16); larger ones get a 413")
    p.add_argument("--api-key", default=os.environ.get("HALSERVE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
                        "(default: $HALSERVE_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model'; the first is reported (default: MODEL as given)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0..65535 (0 picks a free one)")
    return port


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: use a positive number")
    return value


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _say(msg: str) -> None:
    print(f"halserve serve: {msg}", file=sys.stderr, flush=True)


def _elapsed() -> float:
    return time.perf_counter() - _T0


def _bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) socket: errors show now, and port 0 resolves to a real port."""
    from halserve.config import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; "
                          f"pick another --port (0 picks a free one) or --host") from None
    sock.set_inheritable(True)
    return sock


class _LoadLog(logging.Handler):
    """During loading: halserve's INFO records become progress lines; the HAL's choice and the
    engine's summary are kept back and folded into the one start-up line."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.hal_choice: str | None = None
        self.engine_ready: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        if msg.startswith("HAL backend "):
            self.hal_choice = msg.removeprefix("HAL backend ")
        elif msg.startswith("engine ready"):
            self.engine_ready = msg
        elif msg.startswith("loaded ") and record.name.startswith("halserve"):
            # the loader times its own part only (weights map lazily); the elapsed column is the truth
            _say(f"[{_elapsed():5.1f}s] {re.sub(r' in [0-9.]+s$', '', msg)}")
        elif record.levelno >= logging.WARNING:
            _say(f"[{_elapsed():5.1f}s] {record.levelname.lower()}: {msg}")
        else:
            _say(f"[{_elapsed():5.1f}s] {msg}")


def _load_engine(model: str, kwargs: dict, log: _LoadLog):
    """AsyncLLM(model, **kwargs) built in a worker thread, with a heartbeat while it loads.
    Meanwhile this thread imports the web stack, so the two overlap."""
    result: dict = {}

    def load():
        try:
            from halserve.engine.llm import AsyncLLM

            result["engine"] = AsyncLLM(model, **kwargs)
        except BaseException as e:  # re-raised on the main thread
            result["error"] = e

    worker = threading.Thread(target=load, name="halserve-load", daemon=True)
    worker.start()
    import uvicorn  # noqa: F401  (the overlap)

    import halserve.server.openai  # noqa: F401

    next_beat = 2.0
    while worker.is_alive():
        worker.join(timeout=0.25)
        if worker.is_alive() and _elapsed() >= next_beat:
            _say(f"[{_elapsed():5.1f}s] still loading ...")
            next_beat += 5.0
    if "error" in result:
        raise result["error"]
    return result["engine"]


def _startup_line(engine, log: _LoadLog) -> str:
    desc = getattr(engine, "backend_description", "") or ""
    if not log.hal_choice:
        return f"backend: {desc}"
    # "native on cpu (why) [others: ...]" + "backend=native device=cpu accelerated=[...]"
    choice, _, others = log.hal_choice.partition(" [others: ")
    kernels = re.sub(r"^backend=\S+ device=\S+ ?", "", desc)
    line = f"backend {choice}; kernels {kernels or desc}"
    return line + (f"; not chosen: {others.removesuffix(']')}" if others else "")


def _model_line(engine) -> str:
    mc = getattr(engine, "model_config", None)
    parts = []
    if mc is not None:
        parts.append(f"{mc.architecture} ({str(mc.dtype).removeprefix('torch.')})")
    parts.append(f"max_model_len {engine.max_model_len}")
    blocks = (engine.get_metrics() or {}).get("num_kv_blocks")
    if blocks:
        parts.append(f"{blocks} KV blocks of {engine.config.block_size} tokens")
    if engine.tokenizer is None:
        parts.append("no tokenizer: token-id prompts only")
    return ", ".join(parts)


def _make_server(app, args, on_ready):
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                on_ready()

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises a caught signal after shutting down, which would turn a clean
            # stop into a KeyboardInterrupt or a kill by SIGTERM; a clean stop exits with 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    config = uvicorn.Config(app, log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
                            lifespan="off", timeout_graceful_shutdown=max(1, round(args.shutdown_timeout)),
                            timeout_keep_alive=5)
    return Server(config)


def main(args: argparse.Namespace) -> int:
    from halserve.config import ConfigError
    from halserve.generate_cli import engine_kwargs

    model = args.model
    if model is None:
        model = str(demo_model_path())
        if not (Path(model) / "config.json").is_file():
            raise ConfigError(f"the demo model is missing from this install ({model}); "
                              "pass a model directory: halserve serve MODEL")
        default_name = DEMO_MODEL_NAME
    else:
        if not Path(model).exists():
            raise FileNotFoundError(f"model directory {model!r} does not exist")
        default_name = args.model
    names = args.served_model_name or [default_name]
    kwargs = engine_kwargs(args)
    if args.tokenizer:
        kwargs["tokenizer"] = args.tokenizer
    from halserve.config import EngineConfig

    EngineConfig.from_kwargs(model=model, **kwargs)  # every flag checked before anything loads
    if not args.api_key and not _is_loopback(args.host):
        _say(f"warning: serving on {args.host} beyond loopback without --api-key: anyone who can "
             "reach this port can use the model")

    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    # A server shares its cores: the event loop, tokenization and clients run beside the
    # engine. OpenMP threads that spin at every barrier then starve them, and are themselves
    # descheduled mid-region; on 2 shared cores that cost 16x in throughput (docs/performance.md).
    # Must be set before torch (libgomp) loads, i.e. before the engine is imported.
    # (importing halserve set PASSIVE unless the user chose a policy, and on 8+ CPUs a short
    # spin, which a server drops: see halserve/__init__.py)
    import halserve

    if halserve._SPIN_DEFAULTED:
        os.environ.pop("GOMP_SPINCOUNT", None)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    # SIGTERM while loading: stop like Ctrl-C (uvicorn takes the signals over once serving).
    def _interrupt(signum, frame):
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, _interrupt)

    log = _LoadLog()
    hs_logger = logging.getLogger("halserve")
    hs_logger.addHandler(log)
    old_level = hs_logger.level
    hs_logger.setLevel(logging.INFO)
    hs_logger.propagate = False
    _say(f"loading {model} ...")
    try:
        engine = _load_engine(model, kwargs, log)
    finally:
        hs_logger.removeHandler(log)
        hs_logger.propagate = True
        hs_logger.setLevel(old_level)
        signal.signal(signal.SIGTERM, old_term)
    _say(_startup_line(engine, log))
    _say(f"model loaded in {_elapsed():.1f}s: {_model_line(engine)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from halserve.server.openai import build_app

    app = build_app(engine, names, api_key=args.api_key, model_root=model,
                    max_body_bytes=int(args.max_request_body_mb * (1 << 20)))
    shown = f"[{host}]" if ":" in host else host

    def on_ready():
        auth = ", API key required" if args.api_key else ""
        _say(f"ready on http://{shown}:{port} (model {names[0]!r}{auth}) after {_elapsed():.1f}s")

    server = _make_server(app, args, on_ready)
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()
    _say("shut down cleanly")
    return 0
