"""``halserve bench cpu``'s batched decode with every engine loaded at once and stepped in
turn: one decode step of each halserve engine and of HF transformers (its forward with its KV
cache, greedy), round after round, so that each engine's steps meet the same load.

Why: on a shared box another job's load comes and goes over minutes, and a parallel region
whose thread is descheduled waits for it, so a step can take several times its quiet time.
Engines timed one after another, minutes apart, were ranked by the load they met (four
sittings on the 2-vCPU box at load 5-8 put native at 0.49-1.19x HF with the same code). In
turn, the median step of each is taken over the same minutes. The rate is n over the median
step of n sequences decoding together (every prompt prefilled in one step, as HF does)."""
from __future__ import annotations

import statistics
import time


def _hf_stepper(model, dtype: str, prompts: list[list[int]]):
    """HF transformers' greedy decode step on ``prompts`` after their prefill: a callable."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    state = {}
    with torch.no_grad():
        o = hf(torch.tensor(prompts), use_cache=True)
        state["cache"], state["next"] = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

    def step():
        with torch.no_grad():
            o = hf(state["next"], past_key_values=state["cache"], use_cache=True)
            state["next"] = o.logits[:, -1].argmax(-1, keepdim=True)
    return step


def _engine_stepper(llm, prompts: list[list[int]], steps: int, tag: str):
    """An engine's decode step of ``prompts``, each already past its first token: a callable.
    Refuses a run whose sequences did not all start on the same step (the rate would then
    mix part batches in)."""
    from halserve import SamplingParams

    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    rids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(rids, prompts):
        eng.add_request(rid, p, sp, output_kind="delta")
    started = {o.request_id for o in eng.step() if o.outputs[0].token_ids}
    if len(started) != len(prompts):
        raise RuntimeError(f"{len(started)} of {len(prompts)} sequences started in the first step")

    def step():
        outs = eng.step()
        if eng.failed:
            rid, (_, err) = eng.failed.popitem()
            raise RuntimeError(f"request {rid} failed: {err}")
        if sum(len(o.outputs[0].token_ids) for o in outs) != len(prompts):
            raise RuntimeError("a timed step did not decode every sequence")

    def close():
        for rid in rids:
            eng.abort_request(rid)
    step.close = close
    return step


def interleaved(model, llms: dict[str, object], hf: bool, dtype: str, n: int, prompts: list[list[int]],
                steps: int, warm: int = 1) -> dict[str, dict]:
    """{engine label: {"tok_s", "step_ms" (median), "step_ms_all"}} for ``n`` sequences of
    ``prompts``: ``warm`` untimed steps, then ``steps`` rounds of one step of each engine, the
    order rotated each round (no engine always follows another's cache-cold one)."""
    steppers = {label: _engine_stepper(llm, prompts, steps + warm, f"il{n}-{label}") for label, llm in llms.items()}
    if hf:
        steppers["HF transformers"] = _hf_stepper(model, dtype, prompts)
    try:
        for s in steppers.values():
            for _ in range(warm):
                s()
        times = {k: [] for k in steppers}
        order = list(steppers)
        for r in range(steps):
            for k in order[r % len(order):] + order[:r % len(order)]:
                t = time.perf_counter()
                steppers[k]()
                times[k].append(time.perf_counter() - t)
    finally:
        for s in steppers.values():
            if hasattr(s, "close"):
                s.close()
        steppers.pop("HF transformers", None)
    return {k: {"tok_s": n / statistics.median(v), "step_ms": statistics.median(v) * 1e3,
                "step_ms_all": [round(x * 1e3, 1) for x in v]} for k, v in times.items()}
