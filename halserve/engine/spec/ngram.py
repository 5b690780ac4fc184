"""Prompt lookup: the last n tokens (n from prompt_lookup_max down to prompt_lookup_min)
matched against the sequence so far; the tokens that followed the latest earlier match are
the draft. No model, no device: it pays off on text that repeats its context (editing
code, quoting a document).

``ngram_lookup`` is the rule, written plainly; the proposer runs ``ngram_draft``, the same
rule from the other end (an earlier position holding the last token, then how far back each
such match reaches), on an array kept per sequence and grown by the tokens each step adds:
a step costs one vectorised compare over the sequence instead of converting the whole list
and comparing every window at every n (0.5 ms a row at 1600 tokens on the dev box)."""
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
            return _continue(arr, int(hits[-1]) + n, length, k)
    return []


def ngram_draft(arr: np.ndarray, length: int, n_max: int, n_min: int, k: int) -> list[int]:
    """``ngram_lookup(arr[:length], n_max, n_min, k)``: the earlier positions e holding the
    last token, each match's length (how far arr[e - j] == arr[length - 1 - j] holds, up to
    n_max), the longest, and of those the latest."""
    if length < 2:
        return []
    ends = np.flatnonzero(arr[:length - 1] == arr[length - 1])
    if not len(ends):
        return []
    matched = np.ones(len(ends), dtype=np.int64)
    alive = np.ones(len(ends), dtype=bool)
    for j in range(1, n_max):
        alive &= ends >= j  # a match cannot reach past the start
        idx = np.flatnonzero(alive)
        if not len(idx):
            break
        alive[idx] = arr[ends[idx] - j] == arr[length - 1 - j]
        matched += alive
    best = int(matched.max())
    if best < n_min:
        return []
    end = int(ends[np.flatnonzero(matched >= best)[-1]])
    return _continue(arr, end + 1, length, k)


def _continue(arr: np.ndarray, start: int, length: int, k: int) -> list[int]:
    """The k tokens from ``start``; where the match ran into the suffix itself the text repeats
    with period length - start, so the draft continues it (position length + m copies
    position start + m)."""
    draft = arr[start:min(start + k, length)].tolist()
    period = length - start
    while len(draft) < k:
        draft.append(draft[len(draft) - period])
    return draft


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, config, vocab_size):
        super().__init__(config, vocab_size)
        # seq_id -> [int64 array (with room), tokens in it, the token list mirrored, seq]
        self._arrays: dict[int, list] = {}

    def propose(self, seqs, ks):
        c = self.config
        if len(self._arrays) > 2 * len(seqs) + 64:  # sequences that left without finished()
            for sid in [sid for sid, ent in self._arrays.items() if ent[3].is_finished]:
                del self._arrays[sid]
        return [ngram_draft(self._array(s), len(s.token_ids), c.prompt_lookup_max, c.prompt_lookup_min, k)
                if k > 0 else [] for s, k in zip(seqs, ks)]

    def _array(self, seq) -> np.ndarray:
        """``seq``'s tokens as an int64 array, grown by the tokens appended since the last step
        (a sequence's token list only grows while it drafts); rebuilt where the list was
        replaced, got shorter or its last mirrored token changed."""
        toks = seq.token_ids
        m = len(toks)
        ent = self._arrays.get(seq.seq_id)
        if ent is None or ent[2] is not toks or ent[1] > m or (ent[1] and ent[0][ent[1] - 1] != toks[ent[1] - 1]):
            arr = np.empty(max(2 * m, 64), dtype=np.int64)
            arr[:m] = toks
            self._arrays[seq.seq_id] = [arr, m, toks, seq]
            return arr
        arr, have = ent[0], ent[1]
        if m > len(arr):
            arr = ent[0] = np.concatenate([arr[:have], np.empty(max(m, 2 * len(arr)) - have, dtype=np.int64)])
        if m > have:
            arr[have:m] = toks[have:m]
            ent[1] = m
        return arr

    def finished(self, seq) -> None:
        self._arrays.pop(seq.seq_id, None)
