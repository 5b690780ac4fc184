"""The only place that touches device tensors: KV cache allocation, the flat batch and
attention metadata, the model call, logits processing and sampling."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from halserve.engine.kv_connector import KVConnector, LayerWaits
from halserve.engine.sampling import SamplingRow, apply_logits_processors, compute_logprobs
from halserve.engine.sampling import sample as sample_rows
from halserve.engine.scheduler import SchedulerOutput
from halserve.engine.spec.verify import position_arrays, position_spans, row_results, scored_rows
from halserve.hal.interface import AttentionMetadata, Backend, SamplingTensors

logger = logging.getLogger("halserve")


@dataclass(slots=True)
class StepResult:
    """Per scheduled sequence that sampled (in scheduling order): the new token, and its
    logprob data when requested."""

    tokens: list[int]
    logprobs: list[tuple[float, int, list[int], list[float]] | None]
    # seq_id -> (first prompt position scored, [(logprob, rank, top_ids, top_lps)] per position)
    prompt_logprobs: dict[int, tuple[int, list]] | None = None
    # rows that verified a draft: seq_id -> (every token emitted, their logprobs); their entry
    # in ``tokens`` is the first of them
    spec: dict[int, tuple[list[int], list]] | None = None


class ModelRunner:
    def __init__(self, hal: Backend, model, model_config, block_size: int, device,
                 dtype: torch.dtype):
        self.hal = hal
        self.model = model
        self.mc = model_config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv_caches: list[torch.Tensor] = []
        self.connector = KVConnector()  # KV blocks to and from a store outside the device
        self.num_blocks = 0
        self.graphs: dict[int, object] = {}  # decode batch bucket -> captured step
        self._static: dict[str, torch.Tensor] = {}
        # one sequence's short prefill chunk that samples (the tail of a prompt whose prefix
        # was a cache hit, the last piece of a chunked prefill): query-length bucket -> step
        self.tail_graphs: dict[int, object] = {}
        self._tail: dict[str, torch.Tensor] = {}
        self._tail_meta: dict[int, AttentionMetadata] = {}
        self._decode_meta: dict[int, AttentionMetadata] = {}
        # speculative decoding (engine/spec): the most draft tokens a row verifies (0: no
        # speculation); with graphs, verify steps replay engine/spec/verify_graph.py's
        self.spec_k = 0
        self.verify = None
        # a draft head reading the target's hidden states (engine/spec/eagle.py): every step,
        # captured ones too, hands them over
        self.hidden_sink = None
        self._layer_events: list | None = None  # see layer_events()
        self.staging = _Staging(hal, device)
        self.tables = _BlockTables()
        self._events: list | None = None  # see _next_event()
        # seconds the host spent blocked on the device reading steps' tokens (its one wait a
        # step): a step's wall time less this is its host time, overlapped or not
        self.wait_seconds = 0.0

    # ---- KV cache ---------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        shape = self.hal.kv_cache_shape(1, self.block_size, self.mc.num_kv_heads, self.mc.head_dim)
        n = 1
        for d in shape:
            n *= d
        return n * self.mc.num_layers * torch.empty((), dtype=self.kv_dtype).element_size()

    @property
    def kv_dtype(self) -> torch.dtype:
        """The cache's storage dtype: the model's, or fp8 (``--kv-cache-dtype``)."""
        return getattr(self.mc, "kv_dtype", None) or self.dtype

    def allocate_kv_cache(self, budget_bytes: int, max_useful_blocks: int) -> int:
        per = self.bytes_per_block()
        num_blocks = min(max(budget_bytes // per, 0), max_useful_blocks)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds no block of {per} bytes; "
                             "raise kv_cache_memory / gpu_memory_utilization")
        shape = self.hal.kv_cache_shape(num_blocks, self.block_size, self.mc.num_kv_heads, self.mc.head_dim)
        # one allocation: layer l's cache is kv_cache[l] (a batch of blocks moves into every
        # layer in one call)
        self.kv_cache = torch.zeros((self.mc.num_layers, *shape), dtype=self.kv_dtype, device=self.device)
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens, %s (%.1f MiB)", num_blocks, self.block_size,
                    str(self.kv_dtype).removeprefix("torch."), num_blocks * per / 2**20)
        return num_blocks

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """One worst-case step (a ``num_tokens`` prefill, ``num_seqs`` sampled rows) on a
        scratch KV cache, so device backends can measure peak activation memory."""
        bs = self.block_size
        nb = -(-num_tokens // bs)
        shape = self.hal.kv_cache_shape(nb, bs, self.mc.num_kv_heads, self.mc.head_dim)
        caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(self.mc.num_layers)]
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=dev),
            block_tables=torch.arange(nb, dtype=torch.int32, device=dev)[None],
            slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=dev),
            max_seqlen_q=num_tokens, max_seqlen_k=num_tokens, query_lens_host=[num_tokens],
            seq_lens_host=[num_tokens], block_size=bs)
        ids = torch.randint(0, self.mc.vocab_size, (num_tokens,), device=dev)
        hidden = self.model.forward(ids, torch.arange(num_tokens, device=dev), caches, meta)
        self.model.compute_logits(hidden[-min(num_seqs, num_tokens):])
        del caches
        self.hal.synchronize()

    def layer_events(self) -> list | None:
        """One ``hal.event()`` a layer, made once: the connector's loads mark each layer copied
        in on them and the forward waits per layer (``LayerWaits``, in the tail graphs too);
        None where the backend runs device work in order."""
        if self._layer_events is None:
            first = self.hal.event()
            if first is not None:
                self._layer_events = [first] + [self.hal.event() for _ in range(self.mc.num_layers - 1)]
        return self._layer_events

    # ---- decode graphs --------------------------------------------------------------------------
    @staticmethod
    def graph_buckets(max_num_seqs: int) -> list[int]:
        sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 16, 16))
        return sorted({min(b, max_num_seqs) for b in sizes})

    def tail_buckets(self) -> list[int]:
        """Query lengths of the tail graphs: powers of two from 2 up to one block (a full
        prefix hit leaves 1..block_size tokens to compute; 1 is a decode row)."""
        out, b = [], 2
        while b < self.block_size:
            out.append(b)
            b *= 2
        return out + [b]

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> int:
        """Capture one decode step (forward + logits) per batch bucket, largest first, on
        static input buffers, then the tail steps (``tail_buckets``); returns how many
        decode graphs were captured (0 where the backend has no graphs). Padding rows write
        to slot -1 and read a 1-token context from block 0."""
        if not self.hal.capabilities.graphs:
            return 0
        from tqdm import tqdm

        dev, bmax = self.device, max_num_seqs
        max_blocks = -(-max_model_len // self.block_size)
        st = self._static = {
            "ids": torch.zeros(bmax, dtype=torch.int64, device=dev),
            "pos": torch.zeros(bmax, dtype=torch.int64, device=dev),
            "slots": torch.full((bmax,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.ones(bmax, dtype=torch.int32, device=dev),
            "tables": torch.zeros(bmax, max_blocks, dtype=torch.int32, device=dev),
            "cu": torch.arange(bmax + 1, dtype=torch.int32, device=dev),
        }
        for b in tqdm(self.graph_buckets(bmax)[::-1], desc="capturing decode graphs", unit="graph"):
            meta = AttentionMetadata(
                cu_seqlens_q=st["cu"][:b + 1], seq_lens=st["seq_lens"][:b], block_tables=st["tables"][:b],
                slot_mapping=st["slots"][:b], max_seqlen_q=1, max_seqlen_k=max_model_len,
                query_lens_host=[1] * b, seq_lens_host=[max_model_len] * b, block_size=self.block_size,
                num_decode_seqs=b, sliding_window=getattr(self.mc, "sliding_window", None))

            def step(b=b, meta=meta):
                hidden = self.model.forward(st["ids"][:b], st["pos"][:b], self.kv_caches, meta)
                return self._outputs(self.model.compute_logits(hidden), hidden)

            graph = self.hal.capture_graph(step)
            if graph is None:  # this bucket runs eagerly (a backend may refuse some sizes only)
                continue
            self.graphs[b] = graph
            self._decode_meta[b] = meta
        if not self.graphs:
            return 0
        self._capture_tail_graphs(max_blocks, max_model_len)
        if self.spec_k:
            from halserve.engine.spec.verify_graph import VerifyGraphs

            self.verify = VerifyGraphs(self, self.spec_k)
            self.verify.capture(max_num_seqs, max_blocks, max_model_len, self.hidden_sink is not None)
        return len(self.graphs)

    def _outputs(self, logits: torch.Tensor, hidden: torch.Tensor):
        """A captured step's outputs: its logits, and its hidden states where a draft head
        reads them."""
        return logits if self.hidden_sink is None else (logits, hidden)

    def _capture_tail_graphs(self, max_blocks: int, max_model_len: int) -> None:
        """One sequence, ``b`` query tokens (the first ``cu[1]`` real), the last real one
        sampled: forward + logits of that row. Eager, such a step is bound by the host's
        kernel launches, not by the device."""
        from tqdm import tqdm

        dev, tmax = self.device, self.tail_buckets()[-1]
        st = self._tail = {
            "ids": torch.zeros(tmax, dtype=torch.int64, device=dev),
            "pos": torch.arange(tmax, dtype=torch.int64, device=dev),
            "slots": torch.full((tmax,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.full((1,), tmax, dtype=torch.int32, device=dev),
            "tables": torch.zeros(1, max_blocks, dtype=torch.int32, device=dev),
            "cu": torch.tensor([0, tmax], dtype=torch.int32, device=dev),
            "last": torch.zeros(1, dtype=torch.int64, device=dev),
        }
        for b in tqdm(self.tail_buckets()[::-1], desc="capturing prefill-tail graphs", unit="graph"):
            st["cu"][1] = b
            st["seq_lens"][0] = b
            meta = AttentionMetadata(
                cu_seqlens_q=st["cu"], seq_lens=st["seq_lens"], block_tables=st["tables"],
                slot_mapping=st["slots"][:b], max_seqlen_q=b, max_seqlen_k=max_model_len,
                query_lens_host=[b], seq_lens_host=[max_model_len], block_size=self.block_size,
                num_decode_seqs=0, sliding_window=getattr(self.mc, "sliding_window", None))
            events = self.layer_events()  # the tail after a prefix hit may be loading
            caches = self.kv_caches if events is None else LayerWaits(self.kv_caches, events)

            def step(b=b, meta=meta, caches=caches):
                hidden = self.model.forward(st["ids"][:b], st["pos"][:b], caches, meta)
                return self._outputs(self.model.compute_logits(hidden.index_select(0, st["last"])), hidden)

            graph = self.hal.capture_graph(step)
            if graph is None:
                return
            self.tail_graphs[b] = graph
            self._tail_meta[b] = meta

    def _stage_graph(self, so: SchedulerOutput, extra: tuple = ()):
        """The captured step that runs ``so``, its inputs copied into its static buffers:
        (graph, rows it returns, whether it waits per layer on ``layer_events``, ``extra``'s
        device views, cu of its hidden rows), or None when ``so`` runs eagerly. ``extra``:
        more host arrays for the step (sampling, token feed), uploaded in the same copy."""
        staged = self._stage_decode(so, extra)
        if staged is None and self.verify is not None and not extra:  # it stages its own draws
            staged = self.verify.stage(so)
        return staged if staged is not None else self._stage_tail(so, extra)

    def _stage_tail(self, so: SchedulerOutput, extra: tuple = ()):
        if not self.tail_graphs or len(so.scheduled) != 1:
            return None
        s = so.scheduled[0]
        seq, n = s.seq, s.num_new_tokens
        graphs = self.tail_graphs
        if s.spec_token_ids or n < 2 or n > max(graphs) or not s.samples or seq.params.prompt_logprobs is not None:
            return None
        b = min(x for x in graphs if x >= n)
        st, bs = self._tail, self.block_size
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        bt = np.asarray(seq.block_ids, dtype=np.int64)
        # padding rows: beyond the sequence's query length (no attention output read), a
        # valid position, and slot -1 (nothing written)
        ids = np.zeros(b, dtype=np.int64)
        ids[:n] = seq.token_ids[start:end]
        pos = np.full(b, end - 1, dtype=np.int64)
        pos[:n] = np.arange(start, end)
        slots = np.full(b, -1, dtype=np.int64)
        slots[:n] = bt[pos[:n] // bs] * bs + pos[:n] % bs
        small = np.array([0, n, end, n - 1], dtype=np.int64)  # cu, seq_len, last row
        views = self.staging.upload(ids, pos, slots, small, bt.astype(np.int32), *extra)
        v_ids, v_pos, v_slots, v_small, v_bt = views[:5]
        st["ids"][:b].copy_(v_ids)
        st["pos"][:b].copy_(v_pos)
        st["slots"][:b].copy_(v_slots)
        st["cu"].copy_(v_small[:2])
        st["seq_lens"].copy_(v_small[2:3])
        st["last"].copy_(v_small[3:4])
        # columns past the table keep stale but valid block ids: nothing reads past seq_len
        st["tables"][0, :len(bt)].copy_(v_bt)
        # a captured graph ignores the host lengths; a backend whose 'graph' calls the step
        # again reads them, so they are kept true
        meta = self._tail_meta[b]
        meta.query_lens_host[0], meta.seq_lens_host[0] = n, end
        return graphs[b], 1, True, views[5:], [0, n]

    def _stage_decode(self, so: SchedulerOutput, extra: tuple = ()):
        n = len(so.scheduled)
        if not self.graphs or so.num_decodes != n or n > max(self.graphs):
            return None
        b = min(x for x in self.graphs if x >= n)
        st, bs = self._static, self.block_size
        seqs = [s.seq for s in so.scheduled]
        # a decode row's input is its last token (a placeholder under async scheduling: fed
        # on the device), at position num_computed_tokens = num_tokens - 1
        ids = np.zeros(b, dtype=np.int64)
        ids[:n] = [seq.token_ids[-1] for seq in seqs]
        pos = np.zeros(b, dtype=np.int64)
        pos[:n] = [seq.num_computed_tokens for seq in seqs]
        tbl = self.tables.gather(seqs, b)
        p = pos[:n]
        slots = np.full(b, -1, dtype=np.int64)
        slots[:n] = tbl[np.arange(n), p // bs].astype(np.int64) * bs + p % bs
        lens = np.ones(b, dtype=np.int32)
        lens[:n] = p + 1
        views = self.staging.upload(ids, pos, slots, lens, tbl, *extra)
        # columns past the table's width keep stale but valid block ids: nothing reads past seq_lens
        for key, v in zip(("ids", "pos", "slots", "seq_lens"), views[:4]):
            st[key][:b].copy_(v)
        st["tables"][:b, :tbl.shape[1]].copy_(views[4])
        # a captured graph ignores the host lengths; a backend whose 'graph' calls the step
        # again reads them (batch-invariant attention per sequence), so they are kept true
        self._decode_meta[b].seq_lens_host[:] = lens.tolist()
        return self.graphs[b], n, False, views[5:], list(range(n + 1))  # decode graphs wait on no layer (hot path)

    # ---- one step -----------------------------------------------------------------------------
    def _prepare(self, so: SchedulerOutput, extra: tuple = ()):
        """The flat batch of an eager step, built with numpy (a loop a row, none a token) and
        uploaded with ``extra`` in one host-to-device copy: (ids, positions, metadata, cu
        (host list), ``extra``'s device views)."""
        bs = self.block_size
        sch = so.scheduled
        n = len(sch)
        starts = [s.seq.num_computed_tokens for s in sch]
        start = np.array(starts, dtype=np.int64)
        tbl = self.tables.gather([s.seq for s in sch], n)
        if so.num_decodes == n:  # a token a row (the common step): no per-token expansion
            q = np.ones(n, dtype=np.int64)
            cu = np.arange(n + 1, dtype=np.int64)
            ids = np.array([s.seq.token_ids[a] for s, a in zip(sch, starts)], dtype=np.int64)
            positions = start
            slots = tbl[cu[:-1], start // bs].astype(np.int64) * bs + start % bs
        else:
            q = np.fromiter((s.num_new_tokens for s in sch), dtype=np.int64, count=n)
            cu = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(q, out=cu[1:])
            ids = np.empty(int(cu[-1]), dtype=np.int64)
            for i, s in enumerate(sch):  # one slice a row
                seq, a, e = s.seq, starts[i], starts[i] + s.num_new_tokens
                # a draft's tokens follow the last real one (engine/spec)
                ids[cu[i]:cu[i + 1]] = seq.token_ids[a:e] if not s.spec_token_ids else \
                    (seq.token_ids[a:] + s.spec_token_ids)[:e - a]
            row = np.repeat(np.arange(n), q)
            positions = np.arange(cu[-1]) - np.repeat(cu[:-1] - start, q)
            slots = tbl[row, positions // bs].astype(np.int64) * bs + positions % bs
        end = start + q
        views = self.staging.upload(ids, positions, slots, cu.astype(np.int32), end.astype(np.int32), tbl,
                                    *extra)
        v_ids, v_pos, v_slots, v_cu, v_lens, v_tbl = views[:6]
        query_lens, seq_lens = q.tolist(), end.tolist()
        meta = AttentionMetadata(
            cu_seqlens_q=v_cu,
            seq_lens=v_lens,
            block_tables=v_tbl,
            slot_mapping=v_slots,
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(seq_lens),
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
            block_size=bs,
            num_decode_seqs=so.num_decodes,
            sliding_window=getattr(self.mc, "sliding_window", None),
        )
        return v_ids, v_pos, meta, cu.tolist(), views[6:]

    def save_blocks(self, blocks: list) -> None:
        """Newly committed blocks to the connector's store: queued, and copied off the device
        at the start of the next step (or a flush), so that a step's outputs do not wait."""
        self.connector.save_kv(self.kv_caches, blocks)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> StepResult:
        """Run ``so`` and wait for its tokens."""
        if not so.kv_loads:
            if self.spec_k:  # speculative decoding (engine/spec) keeps its own step
                # a captured step's sampling state goes up in its one copy (a verify graph's
                # staging writes its own: engine/spec/verify_graph.py)
                staged = self.verify.stage(so) if self.verify is not None else None
                if staged is None:
                    staged = self._stage_graph(so, position_arrays(so))
                return self._execute(so, staged, draws_staged=True)
            return self.launch(so).resolve()
        # the connector's KV, copied in while the host launches the forward that reads it;
        # its host memory is held until the step has synchronised. With per-layer events the
        # copies run on the HAL's copy stream and go first, and the forward waits for each
        # layer's copy; else they are queued on the compute stream after the step's inputs
        # (an upload queued behind them would wait for them all).
        events = self.layer_events()

        def load():
            self.connector.start_load_kv(self.kv_caches, so.kv_loads, events)

        try:
            if events is not None:
                load()
            staged = self._stage_graph(so)
            if staged is not None and events is not None and not staged[2]:
                # a graph with no per-layer waits (a decode graph: a one-token tail after a
                # prefix hit) waits for the whole load (lane 1 moves the layers in order)
                events[-1].wait()
            prepared = self._prepare(so) if staged is None else None
            if events is None:
                load()
            return self._execute(so, staged, prepared, events)
        finally:
            self.connector.wait_for_load_kv()

    def _execute(self, so: SchedulerOutput, staged=None, prepared=None, events=None,
                 draws_staged: bool = False) -> StepResult:
        rows_idx = [i for i, s in enumerate(so.scheduled) if s.samples]
        plp = None
        draw = None
        sink = self.hidden_sink  # engine/spec: a draft head reads the target's states
        if staged is not None:
            graph, n, cu = staged[0], staged[1], staged[4]
            out = graph.replay()
            if sink is not None:  # the graph's output buffers are reused next step: copies
                out, hidden = out
                sink(so, hidden[:cu[-1]].clone(), cu)
            logits = _graph_logits(out[:n])
            if draws_staged:
                draw = _staged_draws(so, rows_idx, staged[3])
            # staged draws carry a sequence a position: no SamplingRow a position to build
            rows, spans = (draw, position_spans(so, rows_idx)) if draw is not None \
                else scored_rows(so, rows_idx, None)[1:]
        else:
            ids, pos, meta, cu, _ = prepared or self._prepare(so)
            caches = self.kv_caches if events is None else LayerWaits(self.kv_caches, events)
            hidden = self.model.forward(ids, pos, caches, meta)
            if sink is not None:
                sink(so, hidden, cu)
            plp = self._prompt_logprobs(so, hidden, cu)
            if not rows_idx:
                return StepResult([], [], plp)
            # every position of a draft is scored in this one forward (engine/spec/verify.py)
            picked, rows, spans = scored_rows(so, rows_idx, cu)
            last = torch.tensor(picked, dtype=torch.int64, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, last)).float()
        want = [r.params.logprobs for r in rows]
        raw = logits.clone() if any(k is not None for k in want) else None
        tokens = sample(self.hal, logits, draw if draw is not None else rows)
        # the step's one read: its tokens (and logprobs) copied together, one wait
        result = self._queue_read(rows, tokens, raw, want, plp).resolve()
        if len(rows) == len(rows_idx):
            return result
        first, first_lp, spec = row_results(so, rows_idx, spans, result.tokens, result.logprobs)
        return StepResult(first, first_lp, plp, spec)

    def _queue_read(self, rows, tokens: torch.Tensor, raw, want: list, plp) -> "PendingStep":
        """Queue the copies of a sampled step's tokens (and, where ``want`` asks, logprobs
        from ``raw``) to the host, and mark them: the PendingStep that reads them."""
        lp_dev = None
        if raw is not None:
            lp_dev = compute_logprobs(raw, tokens, max(k or 0 for k in want))
            lp_dev = tuple(t.to("cpu", non_blocking=True) for t in lp_dev)
        host = tokens.to("cpu", non_blocking=True)  # page-locked, as torch does for such a copy
        event = self._next_event()
        if event is not None:
            event.record()
        return PendingStep(rows, tokens, host, event, plp, (lp_dev, want), self)

    @torch.inference_mode()
    def launch(self, so: SchedulerOutput, prev: "PendingStep | None" = None) -> "PendingStep":
        """Queue ``so`` on the device (forward, logits, sampling) without waiting for it: the
        host reads its tokens later (``PendingStep.resolve``), so it can build the next step
        meanwhile (async scheduling). No spec rows here (``_execute``). A decode row whose
        input token is a placeholder (``Sequence.num_pending``) takes it from ``prev``'s
        sampled tokens, on the device. Every host array of the step goes up in one copy."""
        sch = so.scheduled
        rows_idx = [i for i, s in enumerate(sch) if s.samples]
        seqs = [sch[i].seq for i in rows_idx]
        arrays, hints, processors = _sampling_state(seqs)
        extra = (*arrays, *self._feed(so, prev))
        plp = None
        staged = self._stage_graph(so, extra)
        if staged is not None:
            graph, n, _, views, _ = staged
            if views[-1].numel():
                _feed_ids((self._static if so.num_decodes else self._tail)["ids"], views[-2], views[-1], prev)
            logits = _graph_logits(graph.replay()[:n])
        else:
            ids, pos, meta, cu, views = self._prepare(so, (*extra, np.asarray(
                [cu_end - 1 for cu_end in _row_ends(sch, rows_idx)], dtype=np.int64)))
            views, picked = views[:-1], views[-1]
            if views[-1].numel():
                _feed_ids(ids, views[-2], views[-1], prev)
            hidden = self.model.forward(ids, pos, self.kv_caches, meta)
            if any(s.seq.params.prompt_logprobs is not None for s in sch):  # reads the host: waits
                plp = self._prompt_logprobs(so, hidden, cu)
            logits = self.model.compute_logits(hidden.index_select(0, picked)).float() if rows_idx else None
        if not rows_idx:
            return PendingStep([], None, None, None, plp, None)
        want = [seq.params.logprobs for seq in seqs]
        raw = logits.clone() if any(k is not None for k in want) else None
        tokens = sample(self.hal, logits, _staged_rows(seqs, seqs, views, hints), processors)
        return self._queue_read([sch[i] for i in rows_idx], tokens, raw, want, plp)

    def _feed(self, so: SchedulerOutput, prev: "PendingStep | None") -> tuple[np.ndarray, np.ndarray]:
        """(rows of ``prev``'s tokens, flat input rows of ``so``) for the decode rows whose
        input token ``prev`` sampled: decode rows come first, one token each, so a row's
        input is at its index."""
        src: list[int] = []
        dst: list[int] = []
        if prev is not None:
            row_of = prev.row_of
            for i, s in enumerate(so.scheduled):
                if s.seq.num_pending:
                    src.append(row_of[s.seq.seq_id])
                    dst.append(i)
        return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)

    def _next_event(self):
        """One of two markers used in turn (a step's, while the one before it may be unread)."""
        if self._events is None:
            self._events = [self.hal.event(), self.hal.event()]
        self._events.reverse()
        return self._events[0]

    def _prompt_logprobs(self, so: SchedulerOutput, hidden: torch.Tensor, cu: list[int]):
        """For sequences that asked for prompt_logprobs: the log-probability of every prompt
        token this step's chunk predicts (position p scores token p + 1), with its rank and
        the top alternatives."""
        out: dict[int, tuple[int, list]] = {}
        for i, s in enumerate(so.scheduled):
            seq = s.seq
            k = seq.params.prompt_logprobs
            start = seq.num_computed_tokens
            stop = min(start + s.num_new_tokens, seq.num_prompt_tokens - 1)
            if k is None or stop <= start:
                continue
            rows = torch.arange(cu[i], cu[i] + stop - start, device=self.device)
            targets = torch.tensor(seq.token_ids[start + 1:stop + 1], dtype=torch.int64, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows)).float()
            chosen, rank, top_ids, top_lp = (t.tolist() for t in compute_logprobs(logits, targets, k))
            out[seq.seq_id] = (start + 1, list(zip(chosen, rank, top_ids, top_lp)))
        return out or None


class StagedRows(list):
    """The sequences a launched step samples, with their sampling tensors already on the
    device (``tensors``, from the step's one upload)."""

    __slots__ = ("tensors",)


def sample(hal: Backend, logits: torch.Tensor, rows, processors: bool | None = None) -> torch.Tensor:
    """The step's draw: logits processors where a row has any, then the HAL's ``sample``.
    ``rows``: ``StagedRows`` (launch) or ``SamplingRow``s (``sampling.sample`` builds the
    tensors). ``processors``: whether any row has one, where the caller knows already."""
    if not isinstance(rows, StagedRows):
        return sample_rows(hal, logits, rows)
    if processors is None:
        processors = any(_needs_processors(seq) for seq in rows)
    if processors:
        # the generated ids with the placeholders: min_tokens counts them as a synchronous
        # step would count their tokens (a penalty row never has one: _needs_host_tokens)
        apply_logits_processors(logits, [SamplingRow(seq.params, seq.seed, seq.num_output_tokens,
                                                     seq.prompt_token_ids, seq.token_ids[seq.num_prompt_tokens:])
                                         for seq in rows])
    return hal.sample(logits, rows.tensors)


class PendingStep:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    __slots__ = ("rows", "tokens", "host", "event", "plp", "lp", "runner", "_row_of")

    def __init__(self, rows, tokens, host, event, plp, lp, runner=None):
        self.rows = rows  # the ScheduledSeq that sampled, in order (a spec step: a row a position)
        self.tokens = tokens  # device [B]: what the next step's placeholder rows read
        self.host = host  # their copy to the host, queued
        self.event = event  # recorded after that copy (None: device work runs in order)
        self.plp = plp
        self.lp = lp  # (logprob tensors copied to the host, top-k a row) or None
        self.runner = runner  # its wait_seconds counts the wait
        self._row_of = None

    @property
    def row_of(self) -> dict[int, int]:
        """seq_id -> its row in ``tokens`` (what a next step's placeholder rows read)."""
        if self._row_of is None:
            self._row_of = {s.seq.seq_id: j for j, s in enumerate(self.rows)}
        return self._row_of

    def resolve(self) -> StepResult:
        """Wait for the step (only as far as its own copies) and return its tokens."""
        if self.event is not None:
            t0 = time.perf_counter()
            while not self.event.query():  # the host's one wait a step; the queue after it runs on
                time.sleep(0)
            if self.runner is not None:
                self.runner.wait_seconds += time.perf_counter() - t0
        if not self.rows:
            return StepResult([], [], self.plp)
        tokens = self.host.tolist()
        lp_out: list = [None] * len(tokens)
        if self.lp is not None and self.lp[0] is not None:
            (chosen, rank, top_ids, top_lp), want = self.lp
            chosen, rank, top_ids, top_lp = chosen.tolist(), rank.tolist(), top_ids.tolist(), top_lp.tolist()
            for j, k in enumerate(want):
                if k is not None:
                    lp_out[j] = (chosen[j], rank[j], top_ids[j][:k], top_lp[j][:k])
        return StepResult(tokens, lp_out, self.plp)


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                 np.dtype(np.float32): torch.float32}


class _Staging:
    """A step's host arrays go to the device in one copy, packed into a page-locked byte
    buffer where the HAL wants one. Two buffers are used in turn: a step's copy may still be
    queued while the next step is built (the host reads each step before the one after it
    is built, so the third reuse is safe)."""

    def __init__(self, hal: Backend, device):
        self.hal, self.device = hal, device
        self._bufs: list = [None, None]

    def upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        # a section per dtype (64-byte aligned: Triton specialises on 16-byte alignment),
        # filled with one concatenate and cut into the arrays with one split on the device:
        # a few calls a step whatever the number of arrays
        groups: dict = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.dtype, []).append(i)
        layout, total = [], 0
        for dt, idx in groups.items():
            n = sum(arrays[i].size for i in idx)
            layout.append((dt, idx, total, n))
            total += -(-(n * dt.itemsize) // 64) * 64
        self._bufs.reverse()
        buf = self._bufs[0]
        if buf is None or buf.numel() < total:
            buf = self._bufs[0] = self.hal.empty_host((max(2 * total, 1 << 16),), torch.uint8)
        host = buf.numpy()
        for dt, idx, off, n in layout:
            np.concatenate([arrays[i].reshape(-1) for i in idx], out=host[off:off + n * dt.itemsize].view(dt))
        dev = buf[:total].to(self.device, non_blocking=True)
        out: list = [None] * len(arrays)
        for dt, idx, off, n in layout:
            parts = dev[off:off + n * dt.itemsize].view(_TORCH_DTYPES[dt]).split_with_sizes([arrays[i].size for i in idx])
            for i, part in zip(idx, parts):
                out[i] = part if arrays[i].ndim == 1 else part.view(arrays[i].shape)
        return out


class _BlockTables:
    """The host block tables, kept across steps: a row per sequence that only takes the
    blocks it gained since (a sequence's ``block_ids`` list only grows or is cut short in
    place, or is replaced by a new list, which rebuilds its row), so a step copies whole
    rows with one gather instead of converting every block id again."""

    def __init__(self):
        self.rows = np.zeros((64, 64), dtype=np.int32)
        self.of: dict[int, list] = {}  # seq_id -> [row, the block_ids list mirrored, blocks mirrored, seq]
        self.free: list[int] = []

    def gather(self, seqs, rows: int) -> np.ndarray:
        """[rows, widest] int32 table of ``seqs`` (columns past a row's length hold stale
        but valid block ids or zeros: nothing reads past a sequence's length)."""
        if len(self.of) > 2 * len(seqs) + 64:
            self._sweep()
        idx = np.empty(len(seqs), dtype=np.int64)
        width = 1
        for i, seq in enumerate(seqs):
            ids = seq.block_ids
            ent = self.of.get(seq.seq_id)
            if ent is None:
                ent = self.of[seq.seq_id] = [self._row(), None, 0, seq]
            m = len(ids)
            if ent[1] is not ids or m < ent[2]:
                ent[1], ent[2] = ids, 0
            if m > ent[2]:
                if m > self.rows.shape[1]:
                    self.rows = np.pad(self.rows, ((0, 0), (0, max(m, 2 * self.rows.shape[1]) - self.rows.shape[1])))
                self.rows[ent[0], ent[2]:m] = ids[ent[2]:m]
                ent[2] = m
            idx[i] = ent[0]
            width = max(width, m)
        tbl = np.zeros((rows, width), dtype=np.int32)
        tbl[:len(seqs)] = self.rows[idx, :width]
        return tbl

    def _row(self) -> int:
        if not self.free:
            n = self.rows.shape[0]
            self.rows = np.pad(self.rows, ((0, n), (0, 0)))
            self.free = list(range(2 * n - 1, n - 1, -1))
            if not self.of:
                self.free = list(range(2 * n - 1, -1, -1))
        return self.free.pop()

    def _sweep(self) -> None:
        for sid in [sid for sid, ent in self.of.items() if ent[3].is_finished]:
            self.free.append(self.of.pop(sid)[0])


def _sampling_state(seqs) -> tuple[tuple[np.ndarray, ...], dict, bool]:
    """One pass over the sampled rows (a few lists, not a generator a field; it runs every
    step for every row): (temperature, top_k, top_p, min_p, seed, step arrays as
    ``sampling.build_sampling_tensors`` builds them: the seeded draw is keyed by tokens
    generated so far, a placeholder counted, as its real token would be in a synchronous
    step), the sampler's hints (``_staged_rows``), whether any row has a logits processor."""
    temps, top_k, top_p, min_p, seeds, steps = [], [], [], [], [], []
    greedy = random = processors = False
    for s in seqs:
        p = s.params
        n_out = len(s.token_ids) - s.num_prompt_tokens
        if p.greedy:
            greedy = True
            temps.append(0.0)
        else:
            random = True
            temps.append(p.temperature)
        top_k.append(p.top_k)
        top_p.append(p.top_p)
        min_p.append(p.min_p)
        seeds.append(s.seed)
        steps.append(n_out)
        if not processors and _params_need_processors(p, n_out):
            processors = True
    hints = _sampler_hints(greedy, random, top_k, top_p, min_p)
    arrays = (np.array(temps, dtype=np.float32), np.array(top_k, dtype=np.int32),
              np.array(top_p, dtype=np.float32), np.array(min_p, dtype=np.float32),
              np.array(seeds, dtype=np.int64), np.array(steps, dtype=np.int64))
    return arrays, hints, processors


def _staged_draws(so: SchedulerOutput, rows_idx: list[int], views) -> "StagedRows | None":
    """A spec step's draws as a launched step's: ``views`` (``spec.verify.position_arrays``,
    uploaded with the step) as the sampling tensors, a sequence a scored position; None
    where a logits processor must see each position's own generated ids (the SamplingRows
    then build them)."""
    seqs = [so.scheduled[i].seq for i in rows_idx]
    if any(_needs_processors(seq) for seq in seqs):
        return None
    positions = [seq for i, seq in zip(rows_idx, seqs) for _ in range(1 + len(so.scheduled[i].spec_token_ids))]
    return _staged_rows(positions, seqs, views)


def _staged_rows(rows, seqs, views, hints: dict | None = None) -> StagedRows:
    """``rows`` (a sequence per sampled row) with the sampling tensors already uploaded
    (``views``: temperature, top-k, top-p, min-p, seeds, steps) and the host hints the
    sampler takes from ``seqs``' parameters (``hints``: as ``_sampling_state`` gave them)."""
    out = StagedRows(rows)
    if hints is None:
        ps = [seq.params for seq in seqs]
        hints = _sampler_hints(any(p.greedy for p in ps), not all(p.greedy for p in ps), [p.top_k for p in ps],
                               [p.top_p for p in ps], [p.min_p for p in ps])
    temps, top_k, top_p, min_p, seeds, steps = views[:6]
    out.tensors = SamplingTensors(temperature=temps, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
                                  steps=steps, **hints)
    return out


def _graph_logits(t: torch.Tensor) -> torch.Tensor:
    """A captured step's logits as the sampler takes them (float32), read in place: the
    graph's output buffer is rewritten by its next replay, but every reader of these logits
    (logits processors, the logprobs' copy, the draw) is queued before that replay, on the
    one stream the device runs in order; the draw writes tokens of its own, and a processor
    that edits the buffer in place edits what the replay rewrites whole. So no copy (it was
    ~0.3-1 ms a step at 32 rows of a 32k vocabulary on a CPU), only the cast of a bf16 head."""
    return t.float() if t.dtype != torch.float32 else t


def _sampler_hints(greedy: bool, random: bool, top_k, top_p, min_p) -> dict:
    """SamplingTensors' host hints: whether any row is greedy / random, and the rows' top-k,
    top-p, min-p values."""
    return dict(all_greedy=not random, all_random=not greedy, no_top_k=not any(top_k),
                no_top_p=all(x >= 1.0 for x in top_p), no_min_p=all(x <= 0.0 for x in min_p))


def _params_need_processors(p, num_output_tokens: int) -> bool:
    return bool(p.needs_penalties or p.logit_bias or num_output_tokens < p.min_tokens)


def _needs_processors(seq) -> bool:
    return _params_need_processors(seq.params, seq.num_output_tokens)


def _row_ends(sch, rows_idx: list[int]) -> list[int]:
    """The flat index after each sampled row's last query token."""
    ends, acc = [], 0
    for s in sch:
        acc += s.num_new_tokens
        ends.append(acc)
    return [ends[i] for i in rows_idx]


def _feed_ids(ids: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, prev: "PendingStep") -> None:
    """Placeholder input tokens take the tokens ``prev`` sampled, on the device."""
    ids.index_copy_(0, dst, prev.tokens.index_select(0, src).to(ids.dtype))
