"""The runner's side of a speculative step: which hidden rows to score, with which sampling
state, and how the draws become each row's emitted tokens.

A row with draft d_1..d_k ran its last real token and the drafts as k+1 query tokens; hidden
row j predicts the token after d_j (d_0 = the real token). Each position is sampled as if it
were a plain decode step of its own: output position t = tokens generated so far + j, the
drafts before it counted as generated (penalties, min_tokens), the seeded draw keyed by
(seed, t). ``accept_deterministic`` then keeps the drafts that equal the draws."""
from __future__ import annotations

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
        prompt, out = seq.prompt_token_ids, seq.output_token_ids
        for j in range(len(draft) + 1):
            hidden_rows.append(end - 1 - len(draft) + j)
            rows.append(SamplingRow(seq.params, seq.seed, seq.num_output_tokens + j, prompt,
                                    out + draft[:j] if j else out))
    return hidden_rows, rows, spans


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
