"""Request checks made when a request is added, so that nothing one request carries can make
a later engine step raise for every row in the batch (a token id past the vocabulary in
logit_bias, a stop id the logits cannot index, a non-finite penalty...)."""
from __future__ import annotations

import math

from halserve.engine.sampling import SamplingParams

MAX_LOGIT_BIAS = 100.0  # OpenAI's bound


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name}={v!r} is not valid: must be a finite number")


def validate_request(params: SamplingParams, prompt_ids: list[int], *, vocab_size: int,
                     max_model_len: int, max_num_seqs: int) -> None:
    """Raise ValueError naming the bad field and what is valid; return None when the request
    is safe to schedule."""
    if not all(_is_int(t) for t in prompt_ids):
        raise ValueError("prompt token ids must be integers")
    for name in ("n", "max_tokens", "min_tokens", "top_k", "logprobs", "prompt_logprobs", "seed"):
        v = getattr(params, name)
        if v is not None and not _is_int(v):
            raise ValueError(f"{name}={v!r} is not valid: must be an integer")
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        _finite(name, getattr(params, name))
    if params.n > max_num_seqs:
        raise ValueError(f"n={params.n} is not valid: at most max_num_seqs ({max_num_seqs}) "
                         "sequences can run for one request")
    if params.seed is not None and not -(1 << 63) <= params.seed < (1 << 63):
        raise ValueError(f"seed={params.seed} is not valid: must fit in 64 bits")
    if params.min_tokens >= max_model_len:
        raise ValueError(f"min_tokens={params.min_tokens} is not valid: must be below "
                         f"max_model_len ({max_model_len})")
    for t in params.stop_token_ids or ():
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise ValueError(f"stop_token_ids: {t!r} is not a token id; valid ids are 0..{vocab_size - 1}")
    for k, v in (params.logit_bias or {}).items():
        if not _is_int(k) or not 0 <= k < vocab_size:
            raise ValueError(f"logit_bias: key {k!r} is not a token id; valid ids are 0..{vocab_size - 1}")
        _finite(f"logit_bias[{k}]", v)
        if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias[{k}]={v} is not valid: must be in [-100, 100]")
