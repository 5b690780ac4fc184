"""Front ends: ``LLM`` (blocking, offline batches) and ``AsyncLLM`` (asyncio streaming; the
engine steps in a background thread so the event loop never blocks on it)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from halserve.hostmem import IdleTrimmer
from halserve.config import EngineConfig
from halserve.engine.core import EngineCore
from halserve.engine.outputs import RequestOutput
from halserve.engine.sampling import SamplingParams

logger = logging.getLogger("halserve")

DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo_model"


def _config(model: str | None, kwargs: dict) -> EngineConfig:
    if model is None:
        model = str(DEMO_MODEL)
    return EngineConfig.from_kwargs(model=str(model), **kwargs)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return list(prompts)


class LLM:
    """Offline inference: ``LLM(model, **engine_args).generate(prompts, sampling_params)``."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine = EngineCore(_config(model, kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_metrics(self) -> dict[str, Any]:
        return self.engine.get_metrics()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        plist = _as_prompt_list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(plist):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(plist)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(plist)
        ids = []
        for p, sp in zip(plist, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, p, sp, output_kind="final")  # nothing built per step
            ids.append(rid)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while self.engine.has_unfinished():
                outs = self.engine.step()
                while self.engine.failed:  # finish_reason "error": that request alone
                    outs.append(self.engine.failed.popitem()[1][0])
                for out in outs:
                    if out.finished:
                        done[out.request_id] = out
                        if bar:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [done[r] for r in ids]

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = False,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so chat is not available")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": tok.encode_chat(c, add_generation_prompt=True,
                                                        **(chat_template_kwargs or {}))} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


class AsyncLLM:
    """Streaming front end for servers. ``async for out in llm.generate(p, sp, rid)``."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.config = _config(model, kwargs)
        self.engine = EngineCore(self.config)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self.backend_description = self.engine.hal.describe()
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._metrics: dict[str, Any] = self.engine.get_metrics()
        self._stopped = False
        self._trimmer = IdleTrimmer()
        self._thread = threading.Thread(target=self._loop, name="halserve-engine", daemon=True)
        self._thread.start()

    # ---- engine thread ------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        with self._lock:
            dest = self._streams.get(rid)
        if dest is not None:
            loop, q = dest
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # loop closed
                pass

    def _run_cmd(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params, output_kind, fut = cmd
            try:
                self.engine.add_request(rid, prompt, params, output_kind=output_kind)
                fut.set_result(None)
            except Exception as e:  # bad input goes back to the caller
                fut.set_exception(e)
        elif kind == "abort":
            out = self.engine.abort_request(cmd[1])
            if out is not None:  # its consumer (if still listening) hears the end: "abort"
                self._deliver(cmd[1], out)
        elif kind == "call":
            _, fn, fut = cmd
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:
                fut.set_exception(e)

    def _loop(self) -> None:
        while not self._stopped:
            block = not self.engine.has_unfinished()
            try:
                cmd = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
                self._run_cmd(cmd)
                while True:
                    self._run_cmd(self._cmds.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                self.engine.connector.idle()  # the last write-through
                self._metrics = self.engine.get_metrics()
                self._trimmer.idle()  # what the burst freed goes back to the OS
                continue
            self._trimmer.worked()
            try:
                outs = self.engine.step()
            except Exception as e:  # an engine fault fails the requests in flight, not the server
                logger.exception("engine step failed")
                for rid in list(self.engine.requests):
                    self.engine.abort_request(rid)
                    self._deliver(rid, e)
                continue
            for out in outs:
                self._deliver(out.request_id, out)
            while self.engine.failed:
                rid, (_, err) = self.engine.failed.popitem()
                self._deliver(rid, err)
            self._metrics = self.engine.get_metrics()

    # ---- asyncio side ---------------------------------------------------------------------------
    async def generate(self, prompt, sampling_params: SamplingParams | None, request_id: str,
                       output_kind: str = "cumulative") -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine makes them; ``output_kind`` as vLLM's
        ``RequestOutputKind`` (``cumulative``, ``delta`` or ``final``: engine/outputs.py)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = (loop, q)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        finished = False
        try:
            self._cmds.put(("add", request_id, prompt, sampling_params or SamplingParams(), output_kind, fut))
            await asyncio.wrap_future(fut)
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # client went away or cancelled: free the request's KV blocks
                self._cmds.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    async def call(self, fn):
        """Run ``fn(engine_core)`` on the engine thread (e.g. to reset the prefix cache)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    def get_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    def shutdown(self) -> None:
        self._stopped = True
        self._thread.join(timeout=5)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()
