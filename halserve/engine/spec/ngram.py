"""Prompt lookup: the last n tokens (n from prompt_lookup_max down to prompt_lookup_min)
matched against the sequence so far; the tokens that followed the latest earlier match are
the draft. No model, no device: it pays off on text that repeats its context (editing
code, quoting a document)."""
from __future__ import annotations

import numpy as np

from halserve.engine.spec.proposer import Proposer


def ngram_lookup(tokens: "list[int] | np.ndarray", n_max: int, n_min: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest
    suffix of ``tokens`` with length in [n_min, n_max]; [] when none occurs."""
    arr = np.asarray(tokens, dtype=np.int64)
    length = len(arr)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        # windows starting at 0..length-n-1: the suffix itself (at length-n) is excluded
        windows = np.lib.stride_tricks.sliding_window_view(arr[:length - 1], n)
        hits = np.flatnonzero((windows == arr[length - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            draft = arr[start:start + k].tolist()
            # the match ran into the suffix itself: the text repeats with this period, so the
            # draft continues it (position length + m copies position start + m)
            period = length - start
            while len(draft) < k:
                draft.append(draft[len(draft) - period])
            return draft
    return []


class NgramProposer(Proposer):
    name = "ngram"

    def propose(self, seqs, ks):
        c = self.config
        return [ngram_lookup(s.token_ids, c.prompt_lookup_max, c.prompt_lookup_min, k) if k > 0 else []
                for s, k in zip(seqs, ks)]
