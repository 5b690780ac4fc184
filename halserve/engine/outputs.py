"""vLLM-shaped request outputs.

How much a step's output carries (``EngineCore.add_request(output_kind=...)``, as vLLM's
``RequestOutputKind``): ``cumulative``: everything so far; ``delta``: only what is new since
the last output (token ids, text, logprobs; text that may start a stop string is held back);
``final``: one output, when the request finishes (no per-step work while it runs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from halserve.engine.sampling import Logprob

OUTPUT_KINDS = ("cumulative", "delta", "final")


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: Any = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list | None = None
    metrics: RequestMetrics | None = field(default=None)
    num_cached_tokens: int = 0


def accumulate(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a ``delta`` output into ``acc`` (None: the first one), giving what a ``cumulative``
    output would have said: for a consumer that wants the whole result at the end but the
    engine's per-step work proportional to what changed."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False)
    by_index = {c.index: c for c in acc.outputs}
    for c in delta.outputs:
        a = by_index.get(c.index)
        if a is None:
            a = CompletionOutput(c.index, "", [], None, [] if c.logprobs is not None else None)
            by_index[c.index] = a
            acc.outputs.append(a)
        a.text += c.text
        a.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            if a.logprobs is None:
                a.logprobs = []
            a.logprobs.extend(c.logprobs)  # in place: a long request folds in linear time
        a.cumulative_logprob = c.cumulative_logprob
        a.finish_reason, a.stop_reason = c.finish_reason, c.stop_reason
    acc.finished = delta.finished
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    acc.metrics, acc.num_cached_tokens = delta.metrics, delta.num_cached_tokens
    return acc
