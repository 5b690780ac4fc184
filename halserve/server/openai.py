"""The OpenAI-compatible FastAPI app: completions, chat, models, tokenize, health, metrics.

``build_app(engine, served_model_names=[...], api_key=None)`` takes any object with
``AsyncLLM``'s surface (``generate``, ``abort``, ``tokenizer``, ``max_model_len``,
``model_config``, ``get_metrics``, ``is_running``), so the protocol can be tested with a fake.

Flow of one request: parse and validate (400 on any bad field) -> tokenize in a worker thread
-> check lengths -> ``engine.generate`` per prompt, merged when a completion has several
prompts -> wait for the first output (so engine-side rejections are still a clean 4xx) ->
JSON body, or SSE chunks carrying the engine's ``delta`` outputs (the engine holds back
text that may start a stop string, so stop strings are dealt with in one place). A request whose client goes away is aborted, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from halserve.engine.outputs import accumulate
from halserve.server import protocol as P
from halserve.server.metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger("halserve.server")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
_THREAD_TEXT_LEN = 2048  # encode longer texts off the event loop


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


# ---- app -------------------------------------------------------------------------------------

DEFAULT_MAX_BODY_BYTES = 16 << 20


def build_app(engine: Any, served_model_names: list[str], api_key: str | None = None,
              sampling_params_cls: type | None = None, model_root: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``served_model_names`` (the first is the default)."""
    from halserve import __version__

    server = OpenAIServer(engine, served_model_names, sampling_params_cls, model_root)
    app = FastAPI(title="halserve", version=__version__, redoc_url=None)
    app.state.server = server
    _install_error_handlers(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)

    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", server.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", server.get_model, methods=["GET"])
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/version", server.version, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_endpoint, methods=["GET"])
    from halserve.server.schema import install_openapi

    install_openapi(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(P.OpenAIError)
    async def _openai(_: Request, e: P.OpenAIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it: the client has left

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        err = P.validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{e.detail}: {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(P.error_body(msg, "invalid_request_error", None, code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        logger.error("internal error on %s %s: %s: %s", request.method, request.url.path,
                     type(e).__name__, e, exc_info=e)
        return JSONResponse(P.error_body(f"internal server error ({type(e).__name__}); see the server log",
                                         "server_error", None, "internal_error"), status_code=500)


class ApiKeyMiddleware:
    """401 for /v1/*, /tokenize and /detokenize without ``Authorization: Bearer <key>``.

    Pure ASGI (not BaseHTTPMiddleware) so streaming responses and disconnects pass through
    untouched, and it runs before the body is read: a bad key wins over a bad body."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" \
                and scope["path"].startswith(PROTECTED_PREFIXES):
            got = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = got.strip().partition(b" ")
            # the scheme is case-insensitive (RFC 9110 section 11.1): "bearer" is fine
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self._expected):
                msg = ("missing API key: send 'Authorization: Bearer <key>'" if not got
                       else "incorrect API key provided")
                resp = JSONResponse(P.error_body(msg, "invalid_request_error", None, "invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body over ``limit`` bytes, by its Content-Length before anything is
    read, or as the bytes arrive for a chunked body: an oversized body is never buffered whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _too_large(self, size: str) -> P.OpenAIError:
        return P.OpenAIError(f"request body of {size} bytes is over this server's limit of "
                             f"{self.limit} bytes (--max-request-body-mb)", 413, code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            err = self._too_large(length.decode())
            headers = {"Connection": "close"}
            if int(length) <= 4 * self.limit:
                # read and drop the rest first: closing on unread bytes resets the connection and
                # the client would see a broken pipe instead of this answer
                headers = None
                more = True
                while more:
                    msg = await receive()
                    more = msg["type"] == "http.request" and msg.get("more_body", False)
            await JSONResponse(err.body(), status_code=413, headers=headers)(scope, receive, send)
            return
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise self._too_large(f"more than {self.limit}")
            return msg

        await self.app(scope, limited, send)


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, even when cancelled by a client
    disconnect, so the generator's ``finally`` (which aborts the engine request) runs now
    rather than whenever the garbage collector gets to it."""

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---- the server -------------------------------------------------------------------------------

class OpenAIServer:
    def __init__(self, engine: Any, served_model_names: list[str], sampling_params_cls: type | None,
                 model_root: str | None):
        if not served_model_names:
            raise ValueError("served_model_names must name at least one model")
        self.engine = engine
        self.names = list(served_model_names)
        self.model_root = model_root
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        mc = getattr(engine, "model_config", None)
        self.vocab_size: int | None = getattr(mc, "vocab_size", None)
        if sampling_params_cls is None:
            from halserve.engine.sampling import SamplingParams as sampling_params_cls
        self.SamplingParams = sampling_params_cls
        self.metrics = ServerMetrics(engine.get_metrics, self.names[0])
        self._token_chars: int | None = None

    # ---- shared checks -------------------------------------------------------------------
    def _model_name(self, requested: str | None) -> str:
        if requested is None or requested == "":
            return self.names[0]
        if requested not in self.names:
            raise P.OpenAIError(f"The model `{requested}` does not exist. Served: {', '.join(self.names)}",
                                404, param="model", code="model_not_found")
        return requested

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise P.OpenAIError(f"this model has no tokenizer.json, so {what} is not available; "
                                "send prompts as token ids", param="prompt", code="no_tokenizer")
        return self.tokenizer

    def _check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise P.OpenAIError(f"{param} is empty after tokenization", param=param, code="empty_prompt")
        if self.vocab_size is not None:
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise P.OpenAIError(f"{param}: token id {bad} is out of range; valid ids are "
                                    f"0..{self.vocab_size - 1}", param=param, code="invalid_token_id")

    def _max_tokens(self, n_prompt: int, requested: int | None, explicit: bool, param: str,
                    prompt_param: str = "prompt") -> int | None:
        """max_tokens for the engine; a 400 if the prompt (plus an explicit max_tokens) does not fit."""
        limit = self.max_model_len
        if n_prompt >= limit:
            raise P.OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{n_prompt} tokens, which leaves no room for the completion. Shorten the prompt.",
                param=prompt_param,
                code="context_length_exceeded")
        room = limit - n_prompt
        if requested is None:
            return room
        if requested > room:
            if explicit:
                raise P.OpenAIError(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{n_prompt + requested} tokens ({n_prompt} in the prompt, {requested} for the "
                    f"completion). Reduce the prompt or {param} (at most {room} here).",
                    param=param, code="context_length_exceeded")
            return room
        return requested

    def _params(self, kw: dict[str, Any]):
        try:
            return self.SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            msg = str(e)
            param = msg.split("=", 1)[0] if "=" in msg.split(" ", 1)[0] else None
            raise P.OpenAIError(msg, param=param, code="invalid_parameter") from None

    def _max_token_chars(self) -> int:
        if self._token_chars is None:  # once: the longest token's text in the vocabulary
            get_vocab = getattr(self.tokenizer, "get_vocab", None)
            vocab = get_vocab() if get_vocab is not None else {}
            self._token_chars = max((len(t) for t in vocab), default=1 << 40) or 1  # none: no bound
        return self._token_chars

    def check_text_bound(self, n_chars: int, param: str) -> None:
        """A text of ``n_chars`` characters cannot be fewer than n_chars / (the longest token's
        characters) tokens: refuse one that surely cannot fit before tokenizing it."""
        at_least = -(-n_chars // self._max_token_chars())
        if at_least >= self.max_model_len:
            raise P.OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"{param} ({n_chars} characters) is at least {at_least} tokens. Shorten it.",
                param=param, code="context_length_exceeded")

    async def _encode(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        tok = self._need_tokenizer("a text prompt")
        self.check_text_bound(len(text), param)
        if len(text) > _THREAD_TEXT_LEN:
            return await anyio.to_thread.run_sync(tok.encode, text, add_special_tokens)
        return tok.encode(text, add_special_tokens)

    async def _encode_chat(self, messages: list[dict], add_generation_prompt: bool,
                           continue_final_message: bool, kwargs: dict | None) -> tuple[str, list[int]]:
        tok = self._need_tokenizer("chat")
        self.check_text_bound(sum(len(m.get("content") or "") for m in messages), "messages")

        def render() -> tuple[str, list[int]]:
            text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, **(kwargs or {}))
            return text, tok.encode(text, add_special_tokens=False)

        try:
            return await anyio.to_thread.run_sync(render)
        except P.OpenAIError:
            raise
        except Exception as e:  # template errors (no template, raise_exception(...), bad kwargs)
            raise P.OpenAIError(f"messages: the chat template failed: {e}", param="messages",
                                code="chat_template_error") from None

    # ---- generation --------------------------------------------------------------------------
    async def _abort(self, request_id: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)

    async def _outputs(self, prompts: list[tuple[str | None, list[int]]], params, base_id: str,
                       arrival: float) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, delta RequestOutput) for every engine step, all prompts merged: the engine
        sends what is new (text that may start a stop string held back), never the whole sequence."""
        ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
        trackers = [self.metrics.track(arrival) for _ in prompts]
        finished: set[int] = set()

        def engine_prompt(i: int) -> dict:
            text, token_ids = prompts[i]
            return {"prompt_token_ids": token_ids, "prompt": text}

        tasks: list[asyncio.Task] = []
        try:
            if len(prompts) == 1:
                async with aclosing(self.engine.generate(engine_prompt(0), params, ids[0], "delta")) as gen:
                    async for out in gen:
                        trackers[0].on_output(out)
                        if out.finished:
                            finished.add(0)
                        yield 0, out
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int) -> None:
                try:
                    async with aclosing(self.engine.generate(engine_prompt(i), params, ids[i], "delta")) as gen:
                        async for out in gen:
                            queue.put_nowait((i, out))
                    queue.put_nowait((i, None))
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    queue.put_nowait((i, e))

            tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
            live = len(prompts)
            while live:
                i, item = await queue.get()
                if item is None:
                    live -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                trackers[i].on_output(item)
                if item.finished:
                    finished.add(i)
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            for i, rid in enumerate(ids):
                if i not in finished:
                    trackers[i].abort()
                    await self._abort(rid)

    async def _start(self, request: Request, gen: AsyncIterator) -> Any:
        """The first output of ``gen``; engine rejections become 4xx, a disconnect aborts."""
        try:
            return await _until_disconnect(request, gen.__anext__())
        except StopAsyncIteration:
            raise P.OpenAIError("the engine returned no output", 500, type="server_error",
                                code="internal_error") from None
        except BaseException as e:
            await gen.aclose()
            if isinstance(e, ValueError):
                raise P.OpenAIError(str(e), code="invalid_request") from None
            raise

    async def _collect(self, request: Request, gen: AsyncIterator, first: tuple[int, Any],
                       num_prompts: int) -> list[Any]:
        """The whole RequestOutput per prompt (its deltas folded); the request is aborted if the
        client leaves."""
        final: list[Any] = [None] * num_prompts

        async def drain():
            i, out = first
            final[i] = accumulate(None, out)
            async for i, out in gen:
                final[i] = accumulate(final[i], out)

        try:
            await _until_disconnect(request, drain())
        finally:
            await gen.aclose()
        return final

    # ---- /v1/completions ---------------------------------------------------------------------
    async def completions(self, request: Request):
        arrival = time.perf_counter()
        req: P.CompletionRequest = P.parse(P.CompletionRequest, await request.body())
        model = self._model_name(req.model)
        prompts: list[tuple[str | None, list[int]]] = []
        for i, p in enumerate(req.prompts()):
            param = "prompt" if len(req.prompts()) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                ids = await self._encode(p, req.add_special_tokens, param)
                text = p
            else:
                ids, text = list(p), None
            self._check_ids(ids, param)
            prompts.append((text, ids))
        explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
        longest = max(len(ids) for _, ids in prompts)
        max_tokens = self._max_tokens(longest, req.max_tokens, explicit, "max_tokens")
        kw = req.sampling_kwargs(max_tokens, req.logprobs)
        best_of = req.best_of if req.best_of is not None and req.best_of > req.n else None
        if best_of:  # best_of sequences, ranked by cumulative logprob (which needs logprobs)
            kw.update(n=best_of, logprobs=req.logprobs or 0)
        echo_lps = req.echo and req.logprobs is not None
        if echo_lps:  # the prompt's tokens carry logprobs too, the first one None
            kw["prompt_logprobs"] = max(req.logprobs, req.prompt_logprobs or 0)
        params = self._params(kw)
        rid = req.request_id or P.random_id("cmpl")
        created = P.now()
        if req.echo:
            tok = self.tokenizer
            prompts = [(t if t is not None else (tok.decode(ids) if tok else ""), ids) for t, ids in prompts]
        gen = self._outputs(prompts, params, rid, arrival)
        first = await self._start(request, gen)
        if req.stream:
            return SSEResponse(self._completion_stream(req, model, rid, created, prompts, gen, first))
        final = await self._collect(request, gen, first, len(prompts))
        choices, n_prompt, n_gen = [], 0, 0
        for i, out in enumerate(final):
            n_prompt += len(out.prompt_token_ids)
            n_gen += sum(len(c.token_ids) for c in out.outputs)
            kept = out.outputs
            if best_of:
                # a candidate without a cumulative logprob ranks last, never first
                score = lambda c: c.cumulative_logprob if c.cumulative_logprob is not None else float("-inf")
                kept = sorted(kept, key=lambda c: -score(c))[:req.n]
            for j, c in enumerate(kept):
                text = (prompts[i][0] or "") + c.text if req.echo else c.text
                lps = None
                if req.logprobs is not None:
                    lps = self._completion_logprobs(c.logprobs, c.token_ids, req.logprobs, 0)
                    if echo_lps:
                        lps = self._echo_logprobs(out, req.logprobs, lps)
                choice = {
                    "index": i * req.n + j, "text": text, "logprobs": lps,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                }
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._prompt_logprobs(out, req.prompt_logprobs)
                choices.append(choice)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": P.usage(n_prompt, n_gen)})

    async def _completion_stream(self, req: P.CompletionRequest, model: str, rid: str, created: int,
                                 prompts, gen: AsyncIterator, first) -> AsyncIterator[str]:
        states: dict[int, _ChoiceState] = {}
        n_prompt = {}

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": choices}
            if req.include_usage:
                body["usage"] = usage
            return sse(body)

        def usage_now() -> dict:
            return P.usage(sum(n_prompt.values()), sum(s.num_tokens for s in states.values()))

        async def items():
            yield first
            async for item in gen:
                yield item

        try:
            async for i, out in items():
                n_prompt[i] = len(out.prompt_token_ids)
                for c in out.outputs:
                    idx = i * req.n + c.index
                    st = states.setdefault(idx, _ChoiceState())
                    delta, new_lps = st.advance(c)
                    if st.num_sent_chunks == 0 and req.echo:
                        delta = (prompts[i][0] or "") + delta
                    if not delta and not new_lps and not st.finish_now:
                        continue
                    lp = None
                    if req.logprobs is not None:
                        lp = self._completion_logprobs(new_lps, c.token_ids, req.logprobs,
                                                       st.offset_before)
                    st.num_sent_chunks += 1
                    cont = usage_now() if req.stream_options and req.stream_options.continuous_usage_stats else None
                    yield chunk([{"index": idx, "text": delta, "logprobs": lp,
                                  "finish_reason": c.finish_reason if st.finish_now else None,
                                  "stop_reason": c.stop_reason if st.finish_now else None}], cont)
            if req.include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage_now()})
        except Exception as e:  # headers are out: report in-band, as OpenAI does
            yield sse(_stream_error(e))
        finally:
            await gen.aclose()
        yield SSE_DONE

    def _completion_logprobs(self, lps: list[dict] | None, token_ids: list[int], k: int, offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for d, chosen_id in zip(lps or [], token_ids):
            chosen = d[chosen_id]
            tok = self._token_str(chosen_id, chosen)
            out["tokens"].append(tok)
            out["token_logprobs"].append(_finite(chosen.logprob))
            top = {self._token_str(t, lp): _finite(lp.logprob) for t, lp in _top(d, k)}
            top.setdefault(tok, _finite(chosen.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(tok)
        return out

    def _prompt_logprobs(self, out: Any, k: int) -> list:
        """vLLM's shape: None for the first prompt token, then {token id: {logprob, rank,
        decoded_token}} holding the prompt's own token and the top ``k``."""
        res: list = []
        for d, tid in zip(out.prompt_logprobs or [], out.prompt_token_ids):
            if d is None:
                res.append(None)
                continue
            keep = dict(_top(d, k))
            keep.setdefault(tid, d[tid])
            res.append({str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                                 "decoded_token": self._token_str(t, lp)} for t, lp in keep.items()})
        return res

    def _echo_logprobs(self, out: Any, k: int, gen: dict) -> dict:
        """The completion logprobs object with the prompt's tokens in front (echo)."""
        res: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for d, tid in zip(out.prompt_logprobs or [], out.prompt_token_ids):
            tok = self._token_str(tid, d.get(tid) if d else None)
            res["tokens"].append(tok)
            res["token_logprobs"].append(_finite(d[tid].logprob) if d else None)
            top = None
            if d:
                top = {self._token_str(t, lp): _finite(lp.logprob) for t, lp in _top(d, k)}
                top.setdefault(tok, _finite(d[tid].logprob))
            res["top_logprobs"].append(top)
            res["text_offset"].append(offset)
            offset += len(tok)
        for key in res:
            res[key].extend(gen[key] if key != "text_offset" else [offset + o for o in gen[key]])
        return res

    def _token_str(self, token_id: int, lp: Any) -> str:
        s = getattr(lp, "decoded_token", None)
        if s is None and self.tokenizer is not None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s if s is not None else f"token_id:{token_id}"

    # ---- /v1/chat/completions ----------------------------------------------------------------
    async def chat_completions(self, request: Request):
        arrival = time.perf_counter()
        req: P.ChatCompletionRequest = P.parse(P.ChatCompletionRequest, await request.body())
        model = self._model_name(req.model)
        messages = [m.as_dict() for m in req.messages]
        text, ids = await self._encode_chat(messages, req.add_generation_prompt and not req.continue_final_message,
                                            req.continue_final_message, req.chat_template_kwargs)
        self._check_ids(ids, "messages")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.requested_max_tokens
        max_tokens = self._max_tokens(len(ids), requested, requested is not None, param, "messages")
        params = self._params(req.sampling_kwargs(max_tokens, req.num_logprobs))
        rid = req.request_id or P.random_id("chatcmpl")
        created = P.now()
        gen = self._outputs([(text, ids)], params, rid, arrival)
        first = await self._start(request, gen)
        if req.stream:
            return SSEResponse(self._chat_stream(req, model, rid, created, gen, first))
        (out,) = await self._collect(request, gen, first, 1)
        choices = []
        for c in out.outputs:
            choices.append({
                "index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": self._chat_logprobs(c.logprobs, c.token_ids, req.top_logprobs or 0)}
                if req.logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            })
        n_gen = sum(len(c.token_ids) for c in out.outputs)
        body = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": P.usage(len(out.prompt_token_ids), n_gen)}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(out, req.prompt_logprobs)
        return JSONResponse(body)

    async def _chat_stream(self, req: P.ChatCompletionRequest, model: str, rid: str, created: int,
                           gen: AsyncIterator, first) -> AsyncIterator[str]:
        states = {i: _ChoiceState() for i in range(req.n)}
        n_prompt = len(first[1].prompt_token_ids)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        def usage_now() -> dict:
            return P.usage(n_prompt, sum(s.num_tokens for s in states.values()))

        def chunk(choice: dict) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [choice]}
            if req.include_usage:
                body["usage"] = usage_now() if continuous else None
            return sse(body)

        async def items():
            yield first
            async for item in gen:
                yield item

        try:
            for i in range(req.n):
                yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            async for _, out in items():
                for c in out.outputs:
                    st = states[c.index]
                    delta, new_lps = st.advance(c)
                    if not delta and not new_lps and not st.finish_now:
                        continue
                    choice = {"index": c.index, "delta": {"content": delta} if delta or not st.finish_now else {},
                              "logprobs": {"content": self._chat_logprobs(new_lps, c.token_ids,
                                                                          req.top_logprobs or 0)}
                              if req.logprobs else None,
                              "finish_reason": c.finish_reason if st.finish_now else None}
                    if st.finish_now:
                        choice["stop_reason"] = c.stop_reason
                    yield chunk(choice)
            if req.include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage_now()})
        except Exception as e:
            yield sse(_stream_error(e))
        finally:
            await gen.aclose()
        yield SSE_DONE

    def _chat_logprobs(self, lps: list[dict] | None, token_ids: list[int], k: int) -> list[dict]:
        content = []
        for d, chosen_id in zip(lps or [], token_ids):
            chosen = d[chosen_id]
            tok = self._token_str(chosen_id, chosen)
            content.append({
                "token": tok, "logprob": _finite(chosen.logprob), "bytes": list(tok.encode("utf-8")),
                "top_logprobs": [{"token": (s := self._token_str(t, lp)), "logprob": _finite(lp.logprob),
                                  "bytes": list(s.encode("utf-8"))} for t, lp in _top(d, k)],
            })
        return content

    # ---- small endpoints ---------------------------------------------------------------------
    async def list_models(self):
        return {"object": "list", "data": [self._model_card(n) for n in self.names]}

    async def get_model(self, model: str):
        return self._model_card(self._model_name(model))

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": P.now(), "owned_by": "halserve",
                "root": self.model_root or name, "parent": None, "max_model_len": self.max_model_len}

    async def tokenize(self, request: Request):
        req: P.TokenizeRequest = P.parse(P.TokenizeRequest, await request.body())
        self._model_name(req.model)
        if req.messages is not None:
            add = False if req.add_special_tokens is None else req.add_special_tokens
            text, ids = await self._encode_chat([m.as_dict() for m in req.messages], req.add_generation_prompt,
                                                False, None)
            if add:
                ids = await self._encode(text, True)
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await self._encode(req.prompt, add)
        body = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [self.tokenizer.id_to_token(t) for t in ids]
        return body

    async def detokenize(self, request: Request):
        req: P.DetokenizeRequest = P.parse(P.DetokenizeRequest, await request.body())
        self._model_name(req.model)
        tok = self._need_tokenizer("detokenize")
        if req.tokens:
            self._check_ids(req.tokens, "tokens")
        return {"prompt": tok.decode(req.tokens)}

    async def health(self):
        alive = getattr(self.engine, "is_running", True)
        if not alive:
            return JSONResponse(P.error_body("the engine has stopped", "server_error", None, "engine_dead"),
                                status_code=503)
        return Response(status_code=200)

    async def version(self):
        from halserve import __version__

        return {"version": __version__}

    async def metrics_endpoint(self):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


# ---- streaming state ----------------------------------------------------------------------------

class _ChoiceState:
    """What one choice has streamed so far (text offsets, tokens, whether it has finished)."""

    __slots__ = ("text_sent", "num_tokens", "finished", "finish_now", "num_sent_chunks", "offset_before")

    def __init__(self):
        self.text_sent = 0
        self.num_tokens = 0
        self.finished = False
        self.finish_now = False
        self.num_sent_chunks = 0
        self.offset_before = 0

    def advance(self, c: Any) -> tuple[str, list]:
        """(new text, new per-token logprobs) of delta output ``c``; sets ``finish_now`` once."""
        self.finish_now = False
        if self.finished:
            return "", []
        self.num_tokens += len(c.token_ids)
        self.offset_before = self.text_sent
        self.text_sent += len(c.text)
        if c.finish_reason is not None:
            self.finished = self.finish_now = True
        return c.text, list(c.logprobs or ())


def _top(d: dict, k: int) -> list[tuple[int, Any]]:
    ranked = sorted(((t, lp) for t, lp in d.items() if lp.rank is not None and lp.rank <= k),
                    key=lambda x: x[1].rank)
    return ranked[:k]


def _finite(x: float) -> float:
    return x if x == x and abs(x) != float("inf") else -9999.0


def _stream_error(e: Exception) -> dict:
    if isinstance(e, P.OpenAIError):
        return e.body()
    if isinstance(e, ValueError):
        return P.error_body(str(e), "invalid_request_error", None, "invalid_request")
    logger.error("stream failed: %s: %s", type(e).__name__, e, exc_info=e)
    return P.error_body(f"internal server error ({type(e).__name__}); see the server log",
                        "server_error", None, "internal_error")


async def _until_disconnect(request: Request, awaitable) -> Any:
    """Await ``awaitable`` unless the client disconnects first (then cancel it, raise ClientGone)."""
    work = asyncio.ensure_future(awaitable)

    async def listen():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(listen())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    try:
        await work
    except BaseException:
        pass
    raise ClientGone()

