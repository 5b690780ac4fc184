"""Regressions found in review: sampling settings that validation accepts must run."""
from __future__ import annotations

import pytest

from halserve import LLM, SamplingParams


@pytest.mark.parametrize("backend", ["native", "cpu_amx"])
def test_top_k_beyond_int32_draws_as_top_k_off(checkpoint, backend):
    """top_k at or above the vocabulary keeps every token (native and vLLM alike), however
    large: 2**31 used to overflow the int32 sampling tensor and end the request in "error"."""
    from tests.hal.test_cpu_amx import RUNNABLE

    if backend == "cpu_amx" and not RUNNABLE:
        pytest.skip("cpu_amx needs an x86-64 CPU with AVX2 and FMA")
    llm = LLM(str(checkpoint("llama")), dtype="float32", enforce_eager=True, backend=backend)
    base = dict(temperature=0.9, seed=7, max_tokens=6, ignore_eos=True)
    want = llm.generate([[5, 17, 42]], SamplingParams(**base))[0].outputs[0]
    for k in (2**31, 2**40):
        got = llm.generate([[5, 17, 42]], SamplingParams(**base, top_k=k))[0].outputs[0]
        assert (got.token_ids, got.finish_reason) == (want.token_ids, "length"), k
