"""Speculative decoding: proposers draft tokens, the target model scores every draft position
in one forward, and rejection sampling keeps the output exactly the target's.

- ``config``: the user's ``speculative_config`` dict, validated (vLLM's names).
- ``ngram`` / ``user``: prompt lookup and a user callable (no model).
- ``draft_model``: a smaller model sharing the tokenizer, its KV in the target's block pool.
- ``rejection``: the acceptance rule (the speculative-sampling rule for deterministic drafts).
- ``build_proposer``: config -> proposer.
"""
from __future__ import annotations

from halserve.engine.spec.config import SpeculativeConfig, parse_speculative_config
from halserve.engine.spec.proposer import Proposer, build_proposer
from halserve.engine.spec.rejection import accept_deterministic

__all__ = ["SpeculativeConfig", "parse_speculative_config", "Proposer", "build_proposer",
           "accept_deterministic"]
