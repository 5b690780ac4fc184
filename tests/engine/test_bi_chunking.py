"""Batch-invariant mode through the engine (issue 20): a request's tokens and logprobs are the
same bits alone and beside other requests that change where its prefill chunks end (a small
shared token budget: 1-token chunks) or that push it out of a tiny KV pool (preempted, its
prompt and generated tokens recomputed as a prefill, decode rows now inside chunks).
float32, a tiny random Llama; every CPU backend that runs here in batch-invariant mode
(tests/gpu/test_bi_chunking_gpu.py runs the same check on cuda)."""
from __future__ import annotations

import pytest

from halserve import LLM, SamplingParams
from tests.engine.test_engine import hf_greedy
from tests.helpers.checkpoints import make_checkpoint

# 140 tokens: past two of native's 64-key spans; 280: past cpu_amx's 256-key span (attention.c's
# SPAN), so a row's spans are merged, inside chunks and as decode rows
PROMPT = [(7 * i + 3) % 500 + 5 for i in range(140)]
PROMPT_LONG = [(7 * i + 3) % 500 + 5 for i in range(280)]
PROMPTS = {"native": PROMPT, "cpu_amx": PROMPT_LONG}
OTHERS = [list(range(300, 311)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12, 13, 14, 15, 16, 17], [450, 451, 452]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3, prompt_logprobs=3)
def _cpu_amx_runs() -> bool:
    from halserve.hal.cpu_amx.backend import CpuAmxBackend

    return CpuAmxBackend.probe().score > 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_checkpoint("llama", tmp_path_factory.mktemp("llama"), max_position_embeddings=512))


def _bits(out):
    c = out.outputs[0]
    return out.prompt_logprobs, c.token_ids, c.logprobs


def _run(path, backend, prompt, prompts, **kw):
    """``prompt``'s output bits among ``prompts``, and its request as the scheduler handled
    it: its chunks (first token, count) and how often it was preempted."""
    llm = LLM(path, backend=backend, batch_invariant=True, **kw)
    sched = llm.engine.scheduler
    real = sched.schedule
    seen = {"chunks": [], "preempted": 0}

    def schedule():
        out = real()
        for s in out.scheduled:
            if s.seq.token_ids[:len(prompt)] == prompt:
                seen["chunks"].append((s.seq.num_computed_tokens, s.num_new_tokens))
        seen["preempted"] += sum(1 for s in out.preempted if s.token_ids[:len(prompt)] == prompt)
        return out

    sched.schedule = schedule
    outs = llm.generate(prompts, PARAMS)
    return _bits(outs[prompts.index(prompt)]), seen


def check_chunking_and_preemption(path, backend, prompt=PROMPT, others=OTHERS, pool_blocks=14, **kw):
    """Alone, then among ``others`` with a 4-token budget, then with a ``pool_blocks`` KV pool
    that preempts it after it generated tokens: the same bits each time."""
    alone, seen = _run(path, backend, prompt, [prompt], **kw)
    assert seen["chunks"][0] == (0, len(prompt)) and not seen["preempted"]  # one prefill, then decode rows

    # a budget of 4 tokens shared with the others' decode rows: 1-token chunks, then 4-token ones
    chunked, seen = _run(path, backend, prompt, others + [prompt], max_num_batched_tokens=4,
                         enable_prefix_caching=False, **kw)
    prefill = [n for start, n in seen["chunks"] if start < len(prompt)]
    assert 1 in prefill and len(set(prefill)) > 1, seen["chunks"]
    assert chunked == alone, f"chunks {seen['chunks']}"

    # a pool too small for everyone: the prompt's request (the newest) is preempted and its
    # prompt and generated tokens recomputed in chunks, decode rows now inside a prefill
    squeezed, seen = _run(path, backend, prompt, others + [prompt], num_gpu_blocks_override=pool_blocks,
                          max_num_batched_tokens=64, enable_prefix_caching=False, **kw)
    assert seen["preempted"] > 0, seen
    assert any(n > 1 and start + n > len(prompt) for start, n in seen["chunks"]), seen["chunks"]
    assert squeezed == alone, f"chunks {seen['chunks']}"
    return alone


@pytest.mark.parametrize("backend", [
    "native",
    pytest.param("cpu_amx", marks=[
        pytest.mark.skipif(not _cpu_amx_runs(), reason="cpu_amx needs an x86-64 CPU with AVX2 and FMA")]),
])
def test_a_request_has_the_same_bits_however_it_is_chunked_or_preempted(checkpoint, backend):
    prompt = PROMPTS[backend]
    # a pool that holds the prompt's request alone (its tokens' blocks + 3) but not beside the others
    pool = -(-(len(prompt) + PARAMS.max_tokens) // 16) + 3
    alone = check_chunking_and_preemption(checkpoint, backend, prompt=prompt, pool_blocks=pool, dtype="float32")
    assert alone[1] == hf_greedy(checkpoint, [prompt], PARAMS.max_tokens)[0]  # and right


def test_with_a_sliding_window(tmp_path):
    """Mistral's 32-token window: a row's first span moves with it (native)."""
    path = str(make_checkpoint("mistral", tmp_path))
    alone = check_chunking_and_preemption(path, "native", dtype="float32")
    assert alone[1] == hf_greedy(path, [PROMPT], PARAMS.max_tokens)[0]
