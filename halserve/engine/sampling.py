"""SamplingParams (vLLM's names and defaults), logits processors, and the sampler front end.

The processors (penalties, logit bias, min_tokens) are plain torch on whatever device the
logits live on; the draw itself is the HAL's ``sample`` op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from halserve.hal.interface import Backend, SamplingTensors

_GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. Field names and defaults follow vLLM's SamplingParams."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # filled by the engine: eos ids of the model (not user-facing)
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self) -> None:
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is not valid: {valid}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0 or math.isnan(self.temperature):
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", "must be a finite number > 0")
        for k, v in (self.logit_bias or {}).items():
            # the vocabulary bound is checked when the request is added (engine/validate.py)
            if k < 0 or not -100.0 <= v <= 100.0:
                raise ValueError(f"logit_bias[{k}]={v!r} is not valid: keys are token ids >= 0, "
                                 "values in [-100, 100]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be a positive integer (or None for up to max_model_len)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be an integer in [0, 20]")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "must be an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of them")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def clone(self, **changes: Any) -> "SamplingParams":
        from dataclasses import replace

        return replace(self, **changes)


@dataclass(slots=True)
class SamplingRow:
    """What the runner needs about one sampled row this step."""

    params: SamplingParams
    seed: int
    step: int  # number of tokens already generated by this sequence
    prompt_ids: list[int]
    output_ids: list[int]


def apply_logits_processors(logits: "torch.Tensor", rows: list[SamplingRow]) -> "torch.Tensor":
    """Penalties, logit bias and min_tokens, in place on float32 logits [B, V]."""
    import torch

    vocab = logits.shape[1]
    dev = logits.device
    pen_rows = [i for i, r in enumerate(rows) if r.params.needs_penalties]
    if pen_rows:
        idx = torch.tensor(pen_rows, device=dev)
        sub = logits.index_select(0, idx)
        out_counts = torch.zeros((len(pen_rows), vocab), dtype=torch.float32, device=dev)
        prompt_mask = torch.zeros((len(pen_rows), vocab), dtype=torch.bool, device=dev)
        for j, i in enumerate(pen_rows):
            r = rows[i]
            if r.output_ids:
                ids = torch.tensor(r.output_ids, device=dev)
                out_counts[j].index_add_(0, ids, torch.ones(len(r.output_ids), device=dev))
            if r.params.repetition_penalty != 1.0 and r.prompt_ids:
                prompt_mask[j, torch.tensor(r.prompt_ids, device=dev)] = True
        rep = torch.tensor([rows[i].params.repetition_penalty for i in pen_rows], device=dev)[:, None]
        freq = torch.tensor([rows[i].params.frequency_penalty for i in pen_rows], device=dev)[:, None]
        pres = torch.tensor([rows[i].params.presence_penalty for i in pen_rows], device=dev)[:, None]
        seen = prompt_mask | (out_counts > 0)
        # repetition penalty (CTRL paper): divide positive logits, multiply negative ones
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * out_counts - pres * (out_counts > 0).float()
        logits.index_copy_(0, idx, sub)
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), device=dev)
            vals = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=dev)
            logits[i].index_add_(0, ids, vals)
        if len(r.output_ids) < p.min_tokens:
            banned = list(p.stop_token_ids or [])
            if not p.ignore_eos:
                banned += list(p._eos_token_ids)
            banned = [t for t in banned if 0 <= t < vocab]
            if banned:
                logits[i, banned] = -float("inf")
    return logits


def build_sampling_tensors(rows: list[SamplingRow], device) -> "SamplingTensors":
    import torch

    from halserve.hal.interface import SamplingTensors

    temps = [0.0 if r.params.greedy else float(r.params.temperature) for r in rows]
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    return SamplingTensors(
        temperature=torch.tensor(temps, dtype=torch.float32, device=device),
        top_k=torch.tensor(top_k, dtype=torch.int32, device=device),
        top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
        min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
        seeds=torch.tensor([r.seed for r in rows], dtype=torch.int64, device=device),
        steps=torch.tensor([r.step for r in rows], dtype=torch.int64, device=device),
        all_greedy=all(t == 0.0 for t in temps),
        all_random=all(t > 0.0 for t in temps),
        no_top_k=all(k == 0 for k in top_k),
        no_top_p=all(p >= 1.0 for p in top_p),
        no_min_p=all(p <= 0.0 for p in min_p),
    )


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def compute_logprobs(raw_logits: "torch.Tensor", sampled: "torch.Tensor", num: int):
    """Log-probabilities of the sampled tokens, their ranks and the top-``num`` alternatives.

    Returns device tensors (chosen_lp [B], rank [B], top_ids [B, num], top_lp [B, num]);
    computed from the raw model logits, like vLLM's default ``raw_logprobs`` mode."""
    import torch

    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen = lp.gather(1, sampled.view(-1, 1)).squeeze(1)
    rank = (lp > chosen[:, None]).sum(dim=1) + 1
    if num > 0:
        top_lp, top_ids = lp.topk(num, dim=-1)
    else:
        top_lp = lp.new_empty((lp.shape[0], 0))
        top_ids = sampled.new_empty((lp.shape[0], 0))
    return chosen, rank, top_ids, top_lp


def sample(hal: "Backend", logits: "torch.Tensor", rows: list[SamplingRow]) -> "torch.Tensor":
    """Processors then the HAL draw. ``logits`` [B, V] float32 is modified in place."""
    apply_logits_processors(logits, rows)
    return hal.sample(logits, build_sampling_tensors(rows, logits.device))
