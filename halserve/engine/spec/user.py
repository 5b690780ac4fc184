"""A user's proposer: ``speculative_config={"method": "callable", "proposer": fn,
"num_speculative_tokens": k}``. ``fn(token_ids)`` gets a sequence's prompt and output
token ids and returns up to k draft tokens; extra ones are dropped, a bad answer is an
error that names the callable. A callable with a ``propose_batch(list_of_token_lists, k)``
attribute is called once for the whole batch instead (a model drafter runs one forward)."""
from __future__ import annotations

from halserve.engine.spec.proposer import Proposer


class CallableProposer(Proposer):
    name = "callable"

    def __init__(self, config, vocab_size):
        super().__init__(config, vocab_size)
        self.fn = config.proposer
        self.name = f"callable {getattr(self.fn, '__name__', type(self.fn).__name__)}"

    def propose(self, seqs, ks):
        batch = getattr(self.fn, "propose_batch", None)
        if batch is not None:
            return self.check(batch([list(s.token_ids) for s in seqs], max(ks, default=0)), ks)
        # the callable gets a copy: it must not be able to change the sequence
        return self.check([self.fn(list(s.token_ids)) if k > 0 else [] for s, k in zip(seqs, ks)], ks)
