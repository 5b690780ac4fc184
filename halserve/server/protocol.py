"""OpenAI request/response schemas, validation, and the mapping to ``SamplingParams``.

Requests are pydantic models, strict as OpenAI's API is: ``"10"`` is not an integer and
``"yes"`` not a boolean. A top-level field we do not know is a 400, as OpenAI answers it
("Unrecognized request argument supplied: X"), so nothing a client sets is silently dropped;
vLLM's extension fields that halserve does not implement (``guided_json`` ...) get a 400
saying so by name. Every field we read is checked here, so bad input becomes a 400 with an
OpenAI error body before it can reach the engine. Responses are plain
dicts built by ``openai.py``: they are on the hot streaming path, and pydantic would only
copy them.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_LOGPROBS = 20


# ---- errors ---------------------------------------------------------------------------------

class OpenAIError(Exception):
    """An error to return as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, message: str, status: int = 400, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# vLLM request fields halserve does not implement: refused by name, never dropped
VLLM_UNSUPPORTED = frozenset({
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structural_tag", "structured_outputs", "use_beam_search",
    "length_penalty", "truncate_prompt_tokens", "allowed_token_ids", "bad_words",
    "spaces_between_special_tokens", "prompt_embeds", "return_tokens_as_token_ids",
    "return_token_ids", "priority", "kv_transfer_params", "vllm_xargs", "mm_processor_kwargs",
    "chat_template", "documents", "cache_salt", "logits_processors", "media_io_kwargs",
    "echo", "best_of", "response_format", "tools", "tool_choice", "parallel_tool_calls", "functions",
    "function_call", "suffix",
})


def validation_error(errors: list[dict]) -> OpenAIError:
    """One readable 400 from pydantic's error list: an unknown field first, else the first
    error, naming the field."""
    extra = [e for e in errors if e.get("type") == "extra_forbidden"]
    if extra:
        name = ".".join(str(p) for p in extra[0].get("loc", ()) if p != "body")
        if name in VLLM_UNSUPPORTED:
            return OpenAIError(f"{name} is not supported by this server (a vLLM extension or an "
                               f"OpenAI feature halserve does not implement on this endpoint)",
                               param=name, code="unsupported_parameter")
        return OpenAIError(f"Unrecognized request argument supplied: {name}", param=name,
                           code="unrecognized_argument")
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return OpenAIError(f"malformed JSON body: {detail}".rstrip(": "), code="invalid_json")
    if not loc:
        return OpenAIError(f"request body: {e.get('msg', 'invalid')}",
                           code="invalid_request_body")
    # Union members show up as loc parts like 'str' or 'list[int]': drop them from the name.
    param = ".".join(p for p in loc if not (p[0].isalpha() and ("[" in p or p in _TYPE_NAMES)))
    msg = e.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if e.get("type") == "missing" else f" (got {_short(got)})"
    return OpenAIError(f"{param}: {msg}{shown}", param=param or None, code="invalid_parameter")


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-plain"}


def _short(value: Any, limit: int = 80) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Decode a JSON body (whatever its content-type) into ``model``, or raise a 400."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


# ---- shared pieces --------------------------------------------------------------------------

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)


class _TopLevel(_Request):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_TopLevel):
    """Sampling fields shared by both endpoints (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    request_id: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return v
        for k, b in v.items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids as strings; got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100]; got {b} for token {k}")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available when stream is true (as in vLLM)")
        return self

    def sampling_kwargs(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        """Keyword arguments for ``SamplingParams``; unset fields keep its defaults."""
        kw: dict[str, Any] = dict(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, seed=self.seed,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.logit_bias:
            kw["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---- /v1/completions ------------------------------------------------------------------------

class CompletionRequest(_Sampling):
    # str | list[str] | list[int] | list[list[int]]; checked by hand for one clear message
    prompt: Any = Field(...)
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        bad = ValueError("prompt must be a string, a list of strings, a list of token ids, "
                         "or a list of lists of token ids")
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("prompt is required and must not be empty") if not v else bad
        if all(isinstance(p, str) for p in v):
            return v
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in v):
            return v
        raise bad

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError(f"best_of={self.best_of} must be >= n ({self.n})")
            if self.best_of > 128:
                raise ValueError(f"best_of={self.best_of} must be <= 128")
            if self.stream and self.best_of > self.n:
                raise ValueError("best_of > n is not available when stream is true (as in OpenAI)")
        if self.echo and self.logprobs is not None and self.stream:
            raise ValueError("echo together with logprobs is not available when stream is true")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of strings and/or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [p]
        return list(p)


# ---- /v1/chat/completions -------------------------------------------------------------------

class ContentPart(_Request):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported; only 'text'")
        if self.text is None:
            raise ValueError("a 'text' content part needs a 'text' field")
        return self


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content)
        d = {"role": self.role, "content": content if content is not None else ""}
        if self.name:
            d["name"] = self.name
        return d


class ResponseFormat(_Request):
    type: str = "text"


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format type {self.response_format.type!r} is not supported; only 'text'")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- /tokenize, /detokenize -----------------------------------------------------------------

class TokenizeRequest(_TopLevel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_TopLevel):
    model: str | None = None
    tokens: list[int]


# ---- response helpers -----------------------------------------------------------------------

def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
