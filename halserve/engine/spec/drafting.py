"""The engine's side of a speculative step, kept out of the core loop: draft for the rows
the scheduler reserved room for, and count what was drafted and accepted."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger("halserve")


@dataclass(slots=True)
class SpecStats:
    num_drafts: int = 0  # verify steps of rows that had a draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_acceptance_rate": self.num_accepted_tokens / max(self.num_draft_tokens, 1),
            # tokens a verify step emits: the accepted drafts plus the target's own token
            "spec_decode_mean_accepted_length": 1 + self.num_accepted_tokens / max(self.num_drafts, 1),
        }


def spec_limit(k: int, max_model_len: int) -> Callable:
    """The scheduler's question: how many draft tokens are worth room after ``seq``'s next
    token: k, within the context limit and ``max_tokens`` (a step emits drafts + 1)."""

    def limit(seq) -> int:
        n = min(k, max_model_len - seq.num_tokens)
        if seq.params.max_tokens is not None:
            n = min(n, seq.params.max_tokens - seq.num_output_tokens - 1)
        return n

    return limit


def attach_drafts(proposer, so, fail: Callable[[str, Exception], None]) -> None:
    """Ask ``proposer`` for the rows of ``so`` with reserved draft slots and put the drafts
    into them (``spec_token_ids``, ``num_new_tokens``). A proposer that raises is asked
    again one sequence at a time, and the requests whose call raises alone are ended with
    ``fail`` (their rows leave the step); the others go on."""
    # the scheduler sized spec_slots with spec_limit (context, max_tokens), budget and room
    rows = [s for s in so.scheduled if s.spec_slots > 0 and s.num_new_tokens == 1 and s.samples]
    ks = [s.spec_slots for s in rows]
    if not rows:
        return
    try:
        drafts = proposer.check(proposer.propose([s.seq for s in rows], ks), ks)
    except Exception as batch_error:  # noqa: BLE001 - find whose call it was
        drafts = []
        failed: set[str] = set()
        for s, k in zip(rows, ks):
            try:
                drafts.append(proposer.check(proposer.propose([s.seq], [k]), [k])[0] if len(rows) > 1
                              else _raise(batch_error))
            except Exception as e:  # noqa: BLE001
                logger.warning("speculative proposer failed for request %s: %s", s.seq.request_id, e)
                failed.add(s.seq.request_id)
                drafts.append([])
                fail(s.seq.request_id, e)
        if failed:
            keep = [(s, d) for s, d in zip(rows, drafts) if s.seq.request_id not in failed]
            rows, drafts = [s for s, _ in keep], [d for _, d in keep]
            so.scheduled = [s for s in so.scheduled if s.seq.request_id not in failed]
    for s, d in zip(rows, drafts):
        if d:
            s.spec_token_ids = d
            s.num_new_tokens = 1 + len(d)
    # the runner wants single-token rows first (the attention metadata's decode prefix)
    so.scheduled.sort(key=lambda s: not (s.num_new_tokens == 1 and s.samples))
    so.num_decodes = sum(1 for s in so.scheduled if s.num_new_tokens == 1 and s.samples)


def _raise(e: Exception):
    raise e
