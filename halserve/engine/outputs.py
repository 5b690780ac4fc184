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
