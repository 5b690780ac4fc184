"""The proposer interface and the factory. A proposer sees every sequence that will be
verified this step at once (so one that runs a model drafts the whole batch in one forward
per draft position) and returns up to ``k`` draft tokens for each."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from halserve.engine.sequence import Sequence
    from halserve.engine.spec.config import SpeculativeConfig


class Proposer:
    """Base class. ``propose`` must return, per sequence, at most ``ks[i]`` token ids in
    ``[0, vocab_size)``; fewer (even none) is always allowed."""

    name = "base"

    def __init__(self, config: "SpeculativeConfig", vocab_size: int):
        self.config = config
        self.k = config.num_speculative_tokens
        self.vocab_size = vocab_size

    def propose(self, seqs: "list[Sequence]", ks: list[int]) -> list[list[int]]:
        raise NotImplementedError

    def verified(self, seq: "Sequence", num_valid: int) -> None:
        """The target kept ``num_valid`` tokens of ``seq`` (prompt + output) after this step:
        a proposer with its own KV forgets what lies past them."""

    def finished(self, seq: "Sequence") -> None:
        """``seq`` left the engine (finished, aborted or failed)."""

    def check(self, drafts: list, ks: list[int]) -> list[list[int]]:
        """Drafts as lists of ints, each within its limit; a bad answer is a clear error."""
        if not isinstance(drafts, (list, tuple)) or len(drafts) != len(ks):
            raise ValueError(f"speculative proposer {self.name!r} returned {type(drafts).__name__} "
                             f"of length {len(drafts) if hasattr(drafts, '__len__') else '?'}; expected a list "
                             f"with one list of token ids per sequence ({len(ks)})")
        out = []
        for d, k in zip(drafts, ks):
            d = list(d)
            if d and not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in d):
                raise ValueError(f"speculative proposer {self.name!r} returned draft {d[:8]!r}: token ids "
                                 f"must be integers in [0, {self.vocab_size})")
            out.append(d[:k])
        return out


def build_proposer(config: "SpeculativeConfig", vocab_size: int, **draft_kwargs) -> Proposer:
    """``draft_kwargs`` (hal, the target model and its config, block size, device) are what a
    draft model or head needs to live beside the target."""
    if config.method == "ngram":
        from halserve.engine.spec.ngram import NgramProposer

        return NgramProposer(config, vocab_size)
    if config.method == "callable":
        from halserve.engine.spec.user import CallableProposer

        return CallableProposer(config, vocab_size)
    if config.method == "draft_model":
        from halserve.engine.spec.draft_model import DraftModelProposer

        return DraftModelProposer(config, vocab_size, **draft_kwargs)
    if config.method == "eagle":
        from halserve.engine.spec.eagle import EagleProposer

        return EagleProposer(config, vocab_size, **draft_kwargs)
    raise ValueError(f"speculative method {config.method!r} has no proposer")
