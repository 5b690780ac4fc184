"""The runner's side of a speculative step: which hidden rows to score, with which sampling
state, and how the draws become each row's emitted tokens.

A row with draft d_1..d_k ran its last real token and the drafts as k+1 query tokens; hidden
row j predicts the token after d_j (d_0 = the real token). Each position is sampled as if it
were a plain decode step of its own: output position t = tokens generated so far + j, the
drafts before it counted as generated (penalties, min_tokens), the seeded draw keyed by
(seed, t). ``accept_deterministic`` then keeps the drafts that equal the draws."""
from __future__ import annotations

import numpy as np

from halserve.engine.sampling import SamplingRow
from halserve.engine.spec.rejection import accept_deterministic


def scored_rows(so, rows_idx: list[int], cu: list[int] | None):
    """(flat hidden rows to score, one SamplingRow each, per sampled row its (first, count)
    in them). ``cu`` None: a graph step that already returned one row per sampled row."""
    hidden_rows: list[int] = []
    rows: list[SamplingRow] = []
    spans: list[tuple[int, int]] = []
    for i in rows_idx:
        seq = so.scheduled[i].seq
        draft = so.scheduled[i].spec_token_ids
        spans.append((len(rows), len(draft) + 1))
        end = cu[i + 1] if cu is not None else 0
        prompt, out, p = seq.prompt_token_ids, seq.output_token_ids, seq.params
        # a position's generated ids (the drafts before it counted) are read only by the
        # logits processors: without any, every position shares the list (no copy a token)
        own = p.needs_penalties or p.logit_bias or seq.num_output_tokens < p.min_tokens
        for j in range(len(draft) + 1):
            hidden_rows.append(end - 1 - len(draft) + j)
            rows.append(SamplingRow(p, seq.seed, seq.num_output_tokens + j, prompt,
                                    out + draft[:j] if j and own else out))
    return hidden_rows, rows, spans


def position_spans(so, rows_idx: list[int]) -> list[tuple[int, int]]:
    """Per sampled row its (first, count) among the scored positions (``scored_rows``'
    spans, without building a SamplingRow a position)."""
    spans, at = [], 0
    for i in rows_idx:
        count = 1 + len(so.scheduled[i].spec_token_ids)
        spans.append((at, count))
        at += count
    return spans


def position_arrays(so) -> tuple[np.ndarray, ...]:
    """temperature, top_k, top_p, min_p, seed, step of every scored position of ``so``'s
    sampled rows (as ``scored_rows`` orders them), for the step's one upload: per row, its
    values repeated over its 1 + len(draft) positions, the step counting the drafts before."""
    sch = [s for s in so.scheduled if s.samples]
    n = len(sch)
    reps = np.fromiter((1 + len(s.spec_token_ids) for s in sch), dtype=np.int64, count=n)
    ps = [s.seq.params for s in sch]
    first = np.zeros(n, dtype=np.int64)
    np.cumsum(reps[:-1], out=first[1:])
    within = np.arange(int(reps.sum())) - np.repeat(first, reps)
    return (np.repeat(np.fromiter((0.0 if p.greedy else p.temperature for p in ps), np.float32, n), reps),
            np.repeat(np.fromiter((p.top_k for p in ps), np.int32, n), reps),
            np.repeat(np.fromiter((p.top_p for p in ps), np.float32, n), reps),
            np.repeat(np.fromiter((p.min_p for p in ps), np.float32, n), reps),
            np.repeat(np.fromiter((s.seq.seed for s in sch), np.int64, n), reps),
            np.repeat(np.fromiter((s.seq.num_output_tokens for s in sch), np.int64, n), reps) + within)


def row_results(so, rows_idx: list[int], spans, tokens: list[int], lps: list):
    """Per sampled row its first token and logprob (as a plain step), and for rows that
    verified a draft: seq_id -> (every emitted token, their logprobs)."""
    first, first_lp, spec = [], [], {}
    for i, (start, count) in zip(rows_idx, spans):
        s = so.scheduled[i]
        first.append(tokens[start])
        first_lp.append(lps[start])
        if count > 1:
            emitted = accept_deterministic(s.spec_token_ids, tokens[start:start + count])
            spec[s.seq.seq_id] = (emitted, lps[start:start + len(emitted)])
    return first, first_lp, spec or None
