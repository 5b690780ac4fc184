"""The step loop: schedule -> run -> sample -> output. Synchronous; AsyncLLM drives it from
a background thread."""
from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from halserve.config import EngineConfig
from halserve.engine.kv_cache import KVCacheManager
from halserve.engine.kv_connector import build_kv_connector
from halserve.engine.outputs import OUTPUT_KINDS, CompletionOutput, RequestMetrics, RequestOutput
from halserve.engine.runner import ModelRunner
from halserve.engine.sampling import Logprob, SamplingParams
from halserve.engine.scheduler import Scheduler
from halserve.engine.sequence import Sequence, SeqStatus
from halserve.engine.validate import validate_request

if TYPE_CHECKING:
    from halserve.hal.interface import Backend

logger = logging.getLogger("halserve")

Prompt = "str | list[int] | dict[str, Any]"


@dataclass(slots=True)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    output_kind: str = "cumulative"  # see outputs.OUTPUT_KINDS
    sent: list = field(default_factory=list)  # per sequence: (tokens, text chars, logprobs) sent as deltas
    prompt_logprobs_sent: bool = False  # delta outputs carry the prompt's logprobs once, when complete

    @property
    def finished(self) -> bool:
        seqs = self.seqs  # read for every touched request every step: n = 1 without a generator
        if len(seqs) == 1:
            return seqs[0].status is SeqStatus.FINISHED
        return all(s.is_finished for s in seqs)


class EngineCore:
    def __init__(self, config: EngineConfig, backend: "Backend | None" = None):
        """``backend``: the HAL backend to run on (an instance); None: the one
        ``config.backend`` names, or the best the host has."""
        from halserve import hal
        from halserve.engine.tokenizer import Tokenizer
        from halserve.models.loader import checkpoint_fingerprint, load_model

        self.config = config
        t0 = time.monotonic()
        self.hal = backend or hal.select(config.backend, batch_invariant=config.batch_invariant)
        self.model, self.model_config = load_model(config.model, self.hal, dtype=config.dtype,
                                                   quantization=config.quantization,
                                                   quantize_lm_head=config.quantize_lm_head,
                                                   kv_cache_dtype=config.kv_cache_dtype)
        mc = self.model_config
        self.tokenizer = Tokenizer.from_dir(config.tokenizer or config.model)
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={mc.max_position_embeddings}")
        self.eos_token_ids = tuple(mc.eos_token_ids or (self.tokenizer.eos_token_ids if self.tokenizer else []))
        device = self.hal.device or "cpu"
        self.runner = ModelRunner(self.hal, self.model, mc, config.block_size, device, mc.dtype)
        # before the KV budget is measured: a draft model's weights take device memory too
        self.proposer = self._build_proposer(device)
        draft_bpb = self.proposer.bytes_per_block() if hasattr(self.proposer, "bytes_per_block") else 0
        max_useful = config.max_num_seqs * -(-self.max_model_len // config.block_size) + 1
        if config.num_gpu_blocks_override:
            budget = config.num_gpu_blocks_override * (self.runner.bytes_per_block() + draft_bpb)
        elif config.kv_cache_memory:
            budget = config.kv_cache_memory
        else:
            budget = self.hal.default_kv_cache_bytes(config.gpu_memory_utilization,
                                                     lambda: self.runner.profile_run(config.max_num_batched_tokens,
                                                                                     config.max_num_seqs))
        if draft_bpb:  # a draft model's KV shares the block pool: a block costs both halves
            per = self.runner.bytes_per_block()
            budget = budget * per // (per + draft_bpb)
        num_blocks = self.runner.allocate_kv_cache(budget, max_useful)
        if draft_bpb:
            self.proposer.allocate(num_blocks)
        self.runner.spec_k = self.proposer.k if self.proposer is not None else 0
        if getattr(self.proposer, "needs_hidden", False):
            # a draft head reads the target's hidden states: every step hands them over (set
            # before capture: the captured steps then return them too)
            self.runner.hidden_sink = self.proposer.take_hidden
        if not config.enforce_eager and self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len) \
                and hasattr(self.proposer, "capture_graphs"):  # a draft head's own forwards
            self.proposer.capture_graphs(self.runner.graph_buckets(config.max_num_seqs), self.max_model_len)
        # content, not path: KV blocks cached by one server load on another with the same model
        fp = hashlib.sha256(checkpoint_fingerprint(mc.path)
                            + f"|{mc.dtype}|{config.block_size}|{config.quantization}".encode()).digest()
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, fp)
        self.connector = build_kv_connector(config, self.hal, mc, device, fp, self.max_model_len)
        self.runner.connector = self.connector
        self.connector.start(self.runner.kv_cache,
                             lambda n: self.kv.allocate_fresh(min(n, self.kv.num_free_blocks)),
                             lambda ids: [self.kv.release(b) for b in ids])
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   connector=self.connector)
        if self.proposer is not None:
            from halserve.engine.spec.drafting import SpecStats, spec_limit

            self.scheduler.spec_limit = spec_limit(self.proposer.k, self.max_model_len)
            self.spec_stats = SpecStats()
        self.requests: dict[str, Request] = {}
        # request id -> (its last output, the error): ended by a fault of their own; the
        # front end drains it and tells that request's caller alone
        self.failed: dict[str, tuple[RequestOutput, Exception]] = {}
        self._rng = random.Random(config.seed)
        self._next_seq_id = 0
        self.prompt_tokens_total = 0
        self.steps_run = 0
        self.host_seconds = 0.0
        self.generation_tokens_total = 0
        self.async_scheduling = self._async_scheduling()
        self._inflight = None  # async scheduling: (SchedulerOutput, PendingStep, ends) launched, unread
        self._logged_sync_reasons: set[str] = set()  # the async fallbacks logged once each
        logger.info("engine ready in %.2fs: %s; model %s (%s, %s), max_model_len %d",
                    time.monotonic() - t0, self.hal.describe(), mc.architecture, mc.path,
                    str(mc.dtype).removeprefix("torch."), self.max_model_len)

    def _async_scheduling(self) -> bool:
        """Whether steps are scheduled ahead (``config.async_scheduling``; None: wherever
        possible). True where it is not possible is refused by name."""
        want = self.config.async_scheduling
        if want is False:
            return False
        caps = self.hal.capabilities.async_device
        if caps is None:  # the HAL's default: a device that is not the host runs apart from it
            import torch

            caps = torch.device(self.hal.device or "cpu").type != "cpu"
        why = None
        if self.proposer is not None:
            why = "speculative decoding (speculative_config) runs synchronously"
        elif self.config.kv_offload_host_bytes or self.config.kv_offload_dir:
            why = "KV offload (kv_offload_host_bytes / kv_offload_dir) runs synchronously"
        elif not caps:
            why = f"backend {self.hal.name} runs its device work on the host (nothing to overlap it with)"
        if why is not None:
            if want:
                from halserve.config import ConfigError

                raise ConfigError(f"async_scheduling=True is not supported here: {why}; "
                                  "leave async_scheduling unset (auto) or set it false")
            logger.info("async scheduling off: %s", why)
            return False
        logger.info("async scheduling on: step n+1 is built while step n runs")
        return True

    def _build_proposer(self, device):
        from halserve.engine.spec import build_proposer, parse_speculative_config

        spec = parse_speculative_config(self.config.speculative_config)
        if spec is None:
            return None
        return build_proposer(spec, self.model_config.vocab_size, hal=self.hal, target_config=self.model_config,
                              target_model=self.model, block_size=self.config.block_size, device=device)

    # ---- requests -----------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer.json: pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        # ints only; the types are collected in a C loop (a long prompt: well under a millisecond)
        if isinstance(prompt, (list, tuple)) and all(issubclass(t, int) for t in set(map(type, prompt))):
            return None, list(prompt)
        raise ValueError("a prompt is a str, a list of token ids, or {'prompt_token_ids': [...]}")

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None,
                    output_kind: str = "cumulative") -> None:
        params = params or SamplingParams()
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind={output_kind!r}; valid: {', '.join(OUTPUT_KINDS)}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        text, ids = self.tokenize_prompt(prompt)
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's max_model_len is "
                             f"{self.max_model_len} (prompt plus at least one generated token)")
        if self.kv.blocks_needed(len(ids) + 1) > self.kv.num_blocks:
            raise ValueError(f"the prompt has {len(ids)} tokens but the KV cache holds only "
                             f"{self.kv.num_blocks * self.kv.block_size}; raise kv_cache_memory")
        validate_request(params, ids, vocab_size=vocab, max_model_len=self.max_model_len,
                         max_num_seqs=self.config.max_num_seqs)
        # top_k >= vocab keeps every token, as off does: off, since any k past int32 would
        # overflow the step's int32 sampling arrays
        params = params.clone(_eos_token_ids=self.eos_token_ids,
                              **({"top_k": 0} if params.top_k >= vocab else {}))
        req = Request(request_id, text, ids, params, output_kind=output_kind)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        for i in range(params.n):
            seed = (base_seed + i * 0x9E3779B97F4A7C15) & ((1 << 62) - 1)
            seq = Sequence(self._next_seq_id, request_id, i, list(ids), len(ids), params, seed,
                           arrival_time=req.arrival_time)
            self._next_seq_id += 1
            if self.tokenizer is not None:
                from halserve.engine.tokenizer import IncrementalDetokenizer

                seq.detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            if params.logprobs is not None:
                seq.logprobs = []
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]  # the first prompt token has no logprob
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.prompt_tokens_total += len(ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = "abort"
            if self.proposer is not None:  # a proposer's per-sequence state goes with it
                self.proposer.finished(seq)
            _drop_pending(seq)
        return self._make_output(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        return self._step_async() if self.async_scheduling else self._step_sync()

    def _step_sync(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        # last step's saves, before this step can reuse or overwrite any block
        self.connector.before_step()
        so = self.scheduler.schedule()
        if so.empty:
            self.connector.wait_for_progress()  # a prompt's KV may be loading
            return []
        t1 = time.perf_counter()
        if self.proposer is not None:
            from halserve.engine.spec.drafting import attach_drafts

            attach_drafts(self.proposer, so, self._fail_request)
            if so.empty:
                return []
        try:
            result = self.runner.execute(so)
        except Exception as e:  # noqa: BLE001 - one row's fault must not end the others
            so, result = self._execute_rows_apart(so, e)
        t2 = time.perf_counter()
        touched, to_save = self._take_rows(so, result)
        outs = self._outputs(touched, to_save)
        # host time outside the runner (scheduling, bookkeeping, outputs): what a device
        # waits on between steps when nothing overlaps it
        self.steps_run += 1
        self.host_seconds += (t1 - t0) + (time.perf_counter() - t2)
        return outs

    def _outputs(self, touched: dict, to_save: list) -> list[RequestOutput]:
        if to_save:  # write-through, once the outputs are out (at the next step, or a flush)
            self.runner.save_blocks(to_save)
        self.kv.evicted_hashes.clear()  # write-through already holds them below
        outs = []
        for req in touched.values():
            done = req.finished
            if done or req.output_kind != "final":  # nothing built for a request still running
                outs.append(self._make_output(req, done))
            if done:
                del self.requests[req.request_id]
        return outs

    # ---- async scheduling -----------------------------------------------------------------------
    # Step n+1 is scheduled and launched before the host reads step n's tokens: each row
    # that step n samples holds a placeholder token (Sequence.num_pending) that step n+1's
    # decode row reads from step n's sampled tokens on the device. Once n+1 is queued the
    # host waits for n (its one wait), fills the placeholders in and does the output work
    # while the device runs n+1. A sequence that step n finishes had one more position
    # queued in n+1: that row is dropped when read and its KV was freed with the sequence
    # (the device runs in order: a block freed now is rewritten only by later steps).
    def _step_async(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        self.connector.before_step()
        so = self.scheduler.schedule()
        prev, self._inflight = self._inflight, None
        outs: list[RequestOutput] = []
        if so.empty:
            if prev is None:
                self.connector.wait_for_progress()
                return []
            return self._finish_step(prev, t0)
        if prev is not None and self._needs_host_tokens(so):
            outs, prev = self._finish_step(prev, t0), None
            so = self._without_finished(so)
            if so.empty:
                return outs
            t0 = time.perf_counter()
        t1 = time.perf_counter()
        try:
            pending = self.runner.launch(so, prev[1] if prev is not None else None)
        except Exception as e:  # noqa: BLE001 - one row's fault must not end the others
            if prev is not None:
                outs += self._finish_step(prev, t1)
                so = self._without_finished(so)
                if so.empty:
                    return outs
            so, result = self._execute_rows_apart(so, e)
            return outs + self._process_rows(so, result)
        t2 = time.perf_counter()
        ends = []
        for s in so.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            ends.append(seq.num_computed_tokens)
        for s in pending.rows:
            s.seq.token_ids.append(-1)
            s.seq.num_pending += 1
        self._inflight = (so, pending, ends)
        self.host_seconds += t1 - t0
        if prev is not None:
            outs += self._finish_step(prev, t2)
        else:
            self.host_seconds += time.perf_counter() - t2
        return outs

    def _needs_host_tokens(self, so) -> bool:
        """A row whose sampling reads the tokens it generated (penalties) cannot be built
        before the step in flight is read: that step is then finished first."""
        needs = False
        for s in so.scheduled:
            p = s.seq.params
            if p.prompt_logprobs is not None and "plp" not in self._logged_sync_reasons:
                self._logged_sync_reasons.add("plp")
                logger.info("async scheduling: a step with a prompt_logprobs row waits for the device "
                            "(the prompt's logprobs are read on the host inside the step)")
            if s.seq.num_pending and p.needs_penalties:
                needs = True
                if "penalties" not in self._logged_sync_reasons:
                    self._logged_sync_reasons.add("penalties")
                    logger.info("async scheduling: a step with a presence/frequency/repetition penalty row "
                                "waits for the step before it (the penalties read its tokens)")
        return needs

    @staticmethod
    def _without_finished(so):
        """``so`` less the rows of sequences that finished (or were aborted) meanwhile."""
        so.scheduled = [s for s in so.scheduled if not s.seq.is_finished]
        so.num_decodes = sum(1 for s in so.scheduled if s.num_new_tokens == 1 and s.samples)
        return so

    def _finish_step(self, inflight, t0: float) -> list[RequestOutput]:
        """Read a launched step's tokens and do its host work: prefix-cache commits, tokens
        in place of the placeholders, stop checks, outputs."""
        so, pending, ends = inflight
        tw = time.perf_counter()
        result = pending.resolve()
        t1 = time.perf_counter()
        now = time.monotonic()
        touched: dict[str, Request] = {}
        to_save: list = []
        plp = result.prompt_logprobs or {}
        for s, end in zip(so.scheduled, ends):
            seq = s.seq
            if seq.is_finished or seq.num_computed_tokens < end:  # aborted, or preempted since
                continue
            if seq.seq_id in plp:
                self._add_prompt_logprobs(seq, *plp[seq.seq_id])
            # the prefix cache takes the blocks this step completed, as a synchronous step
            # would (not those the step after it is computing)
            computed, seq.num_computed_tokens = seq.num_computed_tokens, end
            new = self.kv.commit(seq)
            seq.num_computed_tokens = computed
            if new:
                to_save.extend(self.connector.blocks_to_save(seq, new))
        for s, tok, lp in zip(pending.rows, result.tokens, result.logprobs):
            seq = s.seq
            if seq.is_finished:  # aborted or failed while in flight: nothing of it is emitted
                continue
            ids = seq.token_ids
            later = ids[len(ids) - seq.num_pending + 1:]  # the step in flight's placeholder
            del ids[len(ids) - seq.num_pending:]
            seq.num_pending = 0
            self._append_token(seq, tok, lp, now)
            if not seq.is_finished and later:
                ids.extend(later)
                seq.num_pending = len(later)
            touched[seq.request_id] = self.requests[seq.request_id]
        outs = self._outputs(touched, to_save)
        self.steps_run += 1
        self.host_seconds += (tw - t0) + (time.perf_counter() - t1)
        return outs

    def _process_rows(self, so, result) -> list[RequestOutput]:
        """A synchronous step's results (rows run apart after a failed launch)."""
        touched, to_save = self._take_rows(so, result)
        self.steps_run += 1
        return self._outputs(touched, to_save)

    def _take_rows(self, so, result) -> tuple[dict, list]:
        """Apply a synchronous step's results to its rows: computed tokens, KV commits, new
        tokens or verified drafts; the requests touched and the blocks to save."""
        now = time.monotonic()
        touched: dict[str, Request] = {}
        to_save: list = []
        j = 0
        plp, spec, tokens, lps = result.prompt_logprobs, result.spec, result.tokens, result.logprobs
        requests = self.requests
        for s in so.scheduled:
            seq = s.seq
            if plp and seq.seq_id in plp:
                self._add_prompt_logprobs(seq, *plp[seq.seq_id])
            samples = s.samples  # read before num_computed_tokens moves: it derives from it
            verified = spec.get(seq.seq_id) if spec else None
            if verified is not None:
                j += 1
                self._append_verified(s, verified, now, to_save)
                touched[seq.request_id] = self.requests[seq.request_id]
                continue
            seq.num_computed_tokens += s.num_new_tokens
            new = self.kv.commit(seq)
            if new:
                to_save.extend(self.connector.blocks_to_save(seq, new))
            if not samples:
                continue
            self._append_token(seq, tokens[j], lps[j], now)
            j += 1
            touched[seq.request_id] = requests[seq.request_id]
        if self.proposer is not None:
            for s in so.scheduled:
                if s.seq.is_finished:
                    self.proposer.finished(s.seq)
        return touched, to_save

    def drain(self) -> list[RequestOutput]:
        """Finish the step in flight, if any (async scheduling)."""
        inflight, self._inflight = self._inflight, None
        return self._finish_step(inflight, time.perf_counter()) if inflight is not None else []

    def _execute_rows_apart(self, so, error: Exception):
        """The batch failed: run each request's rows again on their own (the KV they write is
        the same), finish with an error only the requests that fail alone, and return the
        rest as one batch result."""
        from halserve.engine.runner import StepResult
        from halserve.engine.scheduler import SchedulerOutput

        groups: dict[str, list] = {}
        for s in so.scheduled:
            groups.setdefault(s.seq.request_id, []).append(s)
        kept: list = []
        tokens: list = []
        lps: list = []
        plp: dict = {}
        spec: dict = {}
        for rid, rows in groups.items():
            try:
                if len(groups) == 1:
                    raise error
                sub = SchedulerOutput(rows, [], sum(1 for r in rows if r.num_new_tokens == 1 and r.samples))
                res = self.runner.execute(sub)
            except Exception as e:  # noqa: BLE001
                logger.warning("request %s failed in a step and was ended: %s", rid, e)
                self._fail_request(rid, e)
                continue
            kept.extend(rows)
            tokens.extend(res.tokens)
            lps.extend(res.logprobs)
            plp.update(res.prompt_logprobs or {})
            spec.update(res.spec or {})
        return SchedulerOutput(kept, so.preempted, 0), StepResult(tokens, lps, plp or None, spec or None)

    def _append_verified(self, s, verified, now: float, to_save: list) -> None:
        """A row that verified a draft: its KV is valid through the last accepted draft token
        (the rejected positions' KV is overwritten by later steps before anything reads it),
        and its tokens are taken one at a time, as plain steps would (stop conditions,
        prefix-cache commits, offload write-through); what follows a stop is dropped."""
        seq = s.seq
        emitted, lps = verified
        st = self.spec_stats
        st.num_drafts += 1
        st.num_draft_tokens += len(s.spec_token_ids)
        st.num_accepted_tokens += len(emitted) - 1
        for tok, lp in zip(emitted, lps):
            seq.num_computed_tokens += 1
            new = self.kv.commit(seq)
            if new:
                to_save.extend(self.connector.blocks_to_save(seq, new))
            self._append_token(seq, tok, lp, now)
            if seq.is_finished:
                return
        self.proposer.verified(seq, seq.num_computed_tokens)

    def _fail_request(self, request_id: str, error: Exception) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = "error"
            if self.proposer is not None:
                self.proposer.finished(seq)
            _drop_pending(seq)
        self.failed[request_id] = (self._make_output(req), error)

    def _append_token(self, seq: Sequence, tok: int, lp, now: float) -> None:
        p = seq.params
        seq.token_ids.append(tok)
        self.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        if lp is not None:
            chosen, rank, top_ids, top_lps = lp
            d = {tid: Logprob(v, r + 1, self._decode_one(tid)) for r, (tid, v) in enumerate(zip(top_ids, top_lps))}
            d[tok] = Logprob(chosen, rank, self._decode_one(tok))
            seq.logprobs.append(d)
            seq.cumulative_logprob += chosen
        text_before = len(seq.text)
        if seq.detok is not None:
            seq.text += seq.detok.add(tok)
        n_tokens = len(seq.token_ids)
        n_out = n_tokens - seq.num_prompt_tokens
        reason = stop = None
        if not p.ignore_eos and tok in self.eos_token_ids and n_out >= p.min_tokens:
            reason, stop = "stop", None
        elif tok in p.stop_token_ids and n_out >= p.min_tokens:
            reason, stop = "stop", tok
        elif p.stop and n_out >= p.min_tokens and (hit := self._find_stop(seq, text_before)) is not None:
            reason, stop = "stop", hit
        elif p.max_tokens is not None and n_out >= p.max_tokens:
            reason = "length"
        elif n_tokens >= self.max_model_len or n_tokens >= self.kv.num_blocks * self.kv.block_size:
            reason = "length"  # the context is full (model limit, or the whole KV cache: no block for one more token)
        if reason is not None:
            if seq.detok is not None and not isinstance(stop, str):
                seq.text += seq.detok.flush()  # release a held-back partial character
            seq.finish_reason, seq.stop_reason = reason, stop
            seq.status = SeqStatus.FINISHED
            self.scheduler.remove(seq)

    def _add_prompt_logprobs(self, seq: Sequence, first: int, rows: list) -> None:
        for j, (chosen, rank, top_ids, top_lps) in enumerate(rows):
            pos = first + j
            if pos != len(seq.prompt_logprobs):  # recomputed after a preemption: have it already
                continue
            tok = seq.token_ids[pos]
            d = {tid: Logprob(v, r + 1, self._decode_one(tid)) for r, (tid, v) in enumerate(zip(top_ids, top_lps))}
            d[tok] = Logprob(chosen, rank, self._decode_one(tok))
            seq.prompt_logprobs.append(d)

    @staticmethod
    def _delta(req: Request, i: int, s: Sequence) -> CompletionOutput:
        """What ``s`` has that was not sent yet: its new token ids, text and logprobs. Text
        that may be the start of a stop string is held back until it is known not to be
        (stop strings are dealt with here alone; a consumer just concatenates)."""
        while len(req.sent) <= i:
            req.sent.append((0, 0, 0))
        n_tok, n_text, n_lp = req.sent[i]
        ids = s.token_ids
        toks = ids[s.num_prompt_tokens + n_tok:len(ids) - s.num_pending]
        end = len(s.text)
        if s.finish_reason is None and s.params.stop:
            from halserve.engine.tokenizer import partial_stop_len

            end -= partial_stop_len(s.text, s.params.stop)
        text = s.text[n_text:end] if end > n_text else ""
        lps = s.logprobs[n_lp:] if s.logprobs is not None else None
        req.sent[i] = (n_tok + len(toks), max(n_text, end), n_lp + len(lps or ()))
        return CompletionOutput(s.index, text, toks, s.cumulative_logprob if lps is not None else None,
                                lps, s.finish_reason, s.stop_reason)

    def _find_stop(self, seq: Sequence, start: int) -> str | None:
        from halserve.engine.tokenizer import find_stop

        hit = find_stop(seq.text, seq.params.stop, start)
        if hit is None:
            return None
        i, s = hit
        seq.text = seq.text[: i + len(s)] if seq.params.include_stop_str_in_output else seq.text[:i]
        return s

    def _decode_one(self, tok: int) -> str | None:
        return self.tokenizer.decode([tok], skip_special_tokens=False) if self.tokenizer else None

    def _make_output(self, req: Request, done: bool | None = None) -> RequestOutput:
        """``done``: ``req.finished`` where the caller has it already."""
        if done is None:
            done = req.finished
        seqs = req.seqs
        if req.output_kind == "delta":
            outs = [self._delta(req, i, s) for i, s in enumerate(seqs)]
        else:
            outs = [CompletionOutput(s.index, s.text, s.output_token_ids,
                                     s.cumulative_logprob if s.logprobs is not None else None,
                                     list(s.logprobs) if s.logprobs is not None else None,
                                     s.finish_reason, s.stop_reason) for s in req.seqs]
        if len(seqs) == 1:
            first_time = seqs[0].first_token_time
        else:
            first = [s.first_token_time for s in seqs if s.first_token_time is not None]
            first_time = min(first) if first else None
        cached = seqs[0].num_cached_tokens if seqs else 0
        metrics = RequestMetrics(req.arrival_time, first_time, time.monotonic() if done else None, cached)
        plp = seqs[0].prompt_logprobs if seqs else None
        if plp is not None and req.output_kind == "delta":  # once, whole: not a copy every step
            if req.prompt_logprobs_sent or len(plp) < len(req.prompt_token_ids):
                plp = None
            else:
                req.prompt_logprobs_sent = True
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, done,
                             prompt_logprobs=list(plp) if plp is not None else None,
                             metrics=metrics, num_cached_tokens=cached)

    # ---- metrics --------------------------------------------------------------------------------
    def get_metrics(self) -> dict[str, Any]:
        sch = self.scheduler
        return {
            "num_requests_running": len({s.request_id for s in sch.running}),
            # waiting: queued, or loading their prefix through the KV connector
            "num_requests_waiting": len({s.request_id for s in (*sch.waiting, *sch.loading)}
                                        - {s.request_id for s in sch.running}),
            "kv_cache_usage": self.kv.usage,
            "prefix_cache_queries": self.kv.stats.queries,
            "prefix_cache_hits": self.kv.stats.hits,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_preemptions_total": sch.num_preemptions,
            "num_kv_blocks": self.kv.num_blocks,
            **(self.spec_stats.as_metrics() if self.proposer is not None else {}),
            "num_steps_total": self.steps_run,
            "host_us_per_step": 1e6 * self.host_seconds / max(self.steps_run, 1),
            **({"offload": st} if (st := self.connector.stats()) is not None else {}),
        }


def _drop_pending(seq: Sequence) -> None:
    """A sequence ended while a step was in flight: its placeholder tokens go."""
    if seq.num_pending:
        del seq.token_ids[len(seq.token_ids) - seq.num_pending:]
        seq.num_pending = 0
