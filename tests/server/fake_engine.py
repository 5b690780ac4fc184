"""A tiny stand-in for AsyncLLM: byte-level tokens, one token per step, no torch.

It lets the protocol (validation, error bodies, SSE shapes, disconnect handling) be tested
in-process in milliseconds; the end-to-end tests run the real engine."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from halserve.engine.outputs import CompletionOutput, RequestOutput
from halserve.engine.sampling import Logprob
from halserve.engine.tokenizer import partial_stop_len

VOCAB = 256
EOS = 0


class ByteTokenizer:
    eos_token_ids = [EOS]
    vocab_size = VOCAB

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i != EOS or not skip_special_tokens).decode("utf-8", "replace")

    def id_to_token(self, i):
        return chr(i)

    def apply_chat_template(self, messages, add_generation_prompt=True, continue_final_message=False, **kw):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    """Generates the reply 'abcdefghij...' (cyclic), one byte per step, for every prompt."""

    def __init__(self, step_delay: float = 0.0, max_model_len: int = 64):
        self.tokenizer = ByteTokenizer()
        self.max_model_len = max_model_len
        self.model_config = SimpleNamespace(vocab_size=VOCAB)
        self.step_delay = step_delay
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.seen_params: list = []
        self.is_running = True

    def get_metrics(self):
        return {"num_requests_running": len(self.active), "num_requests_waiting": 0,
                "kv_cache_usage": len(self.active) / 10, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                "prompt_tokens_total": 0, "generation_tokens_total": 0, "num_preemptions_total": 0}

    async def abort(self, request_id):
        if request_id in self.active:
            self.active.discard(request_id)
            self.aborted.append(request_id)

    async def generate(self, prompt, params, request_id, output_kind="cumulative"):
        """Cumulative outputs, or (``delta``) what is new since the last one with text that may
        start a stop string held back, as EngineCore makes them."""
        sent = [(0, 0, 0)] * params.n  # tokens, characters, logprobs sent per choice
        async for out in self._cumulative(prompt, params, request_id):
            if output_kind == "cumulative":
                yield out
                continue
            if output_kind == "final" and not out.finished:
                continue
            outs = []
            for c in out.outputs:
                nt, nc, nl = sent[c.index] if output_kind == "delta" else (0, 0, 0)
                end = len(c.text)
                if c.finish_reason is None and params.stop:
                    end -= partial_stop_len(c.text, params.stop)
                end = max(end, nc)
                lps = c.logprobs[nl:] if c.logprobs is not None else None
                outs.append(CompletionOutput(c.index, c.text[nc:end], c.token_ids[nt:], None, lps,
                                             c.finish_reason))
                sent[c.index] = (len(c.token_ids), end, nl + len(lps or ()))
            yield RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, outs, out.finished)

    async def _cumulative(self, prompt, params, request_id):
        ids = prompt["prompt_token_ids"]
        if len(ids) >= self.max_model_len:
            raise ValueError("prompt too long (engine check)")
        self.seen_params.append(params)
        self.active.add(request_id)
        toks = [[] for _ in range(params.n)]
        lps = [[] if params.logprobs is not None else None for _ in range(params.n)]
        reasons = [None] * params.n
        finished = False
        try:
            step = 0
            while not finished:
                await asyncio.sleep(self.step_delay)
                if request_id not in self.active:
                    return
                for i in range(params.n):
                    if reasons[i]:
                        continue
                    t = ord("a") + (step + i) % 26
                    toks[i].append(t)
                    if lps[i] is not None:
                        d = {t + 1: Logprob(-0.5, 1, chr(t + 1))} if params.logprobs else {}
                        d[t] = Logprob(-1.0, 2, chr(t))
                        lps[i].append(d)
                    text = self.tokenizer.decode(toks[i])
                    for s in params.stop:
                        if s in text:
                            reasons[i] = "stop"
                    if params.max_tokens is not None and len(toks[i]) >= params.max_tokens:
                        reasons[i] = reasons[i] or "length"
                step += 1
                finished = all(reasons)
                outs = []
                for i in range(params.n):
                    text = self.tokenizer.decode(toks[i])
                    for s in params.stop:
                        if s in text:
                            text = text[: text.index(s)]
                    outs.append(CompletionOutput(i, text, list(toks[i]), None,
                                                 list(lps[i]) if lps[i] is not None else None, reasons[i]))
                yield RequestOutput(request_id, prompt.get("prompt"), ids, outs, finished)
        finally:
            self.active.discard(request_id)
