"""Proposers a JSON speculative config can name ("tests.helpers.proposers:NAME"): the server's
``--speculative-config`` cannot carry a Python function, only its import path."""
from __future__ import annotations


def repeat_last(token_ids: list[int]) -> list[int]:
    """Drafts the last token three times: right on repetitive text, wrong elsewhere, so both
    branches of the acceptance rule run."""
    return [token_ids[-1]] * 3 if token_ids else []


NOT_CALLABLE = 3
