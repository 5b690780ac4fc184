"""One generated sequence: its tokens, progress, KV blocks and finish state (no device code)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from halserve.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    LOADING = 3  # holds device blocks that the KV connector is loading into


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # position among the request's n outputs
    token_ids: list[int]  # prompt then generated tokens
    num_prompt_tokens: int
    params: "SamplingParams"
    seed: int
    arrival_time: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks so far
    num_committed_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_preemptions: int = 0
    load_failed: bool = False  # its connector load could not copy to the device: recompute, no retry
    finish_reason: str | None = None
    stop_reason: Any = None
    # output state
    text: str = ""
    detok: Any = None
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    # async scheduling: placeholder tokens at the end of token_ids, sampled by a step still
    # on the device (the engine fills them in when it reads that step's tokens)
    num_pending: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens known on the host (placeholders left out)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
