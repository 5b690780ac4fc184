"""cuda, batch-invariant, through the engine (issue 20): a request's tokens and logprobs are the
same bits alone, with 1-token and 4-token prefill chunks beside other requests, and after a
preemption that recomputes its generated tokens inside a chunk (tests/engine/test_bi_chunking.py's
check). A 600-token prompt: three of the GPU's 256-key spans; the pool of 44 blocks preempts it
after it generated tokens (the schedule is the engine's, the same on every backend)."""
from __future__ import annotations

import pytest

from tests.engine.test_bi_chunking import check_chunking_and_preemption
from tests.helpers.checkpoints import make_checkpoint

PROMPT = [(5 * i + 1) % 500 + 5 for i in range(600)]


@pytest.mark.parametrize("dtype,eager", [("bfloat16", False), ("float32", True)])
def test_cuda_request_bits_however_chunked_or_preempted(tmp_path, dtype, eager):
    path = str(make_checkpoint("llama", tmp_path, dtype=dtype, max_position_embeddings=1024))
    check_chunking_and_preemption(path, "cuda", prompt=PROMPT, pool_blocks=44, dtype=dtype, enforce_eager=eager)
