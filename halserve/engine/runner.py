"""The only place that touches device tensors: KV cache allocation, the flat batch and
attention metadata, the model call, logits processing and sampling."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from halserve.engine.kv_connector import KVConnector, LayerWaits
from halserve.engine.sampling import compute_logprobs, sample
from halserve.engine.scheduler import SchedulerOutput
from halserve.engine.spec.verify import row_results, scored_rows
from halserve.hal.interface import AttentionMetadata, Backend

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
        # speculative decoding (engine/spec): one sequence verifying a draft, the same step as
        # a tail graph's but returning every position's logits; captured when asked for
        self.capture_verify = False
        self.verify_graphs: dict[int, object] = {}
        self._layer_events: list | None = None  # see layer_events()

    # ---- KV cache ---------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        shape = self.hal.kv_cache_shape(1, self.block_size, self.mc.num_kv_heads, self.mc.head_dim)
        n = 1
        for d in shape:
            n *= d
        return n * self.mc.num_layers * torch.empty((), dtype=self.dtype).element_size()

    def allocate_kv_cache(self, budget_bytes: int, max_useful_blocks: int) -> int:
        per = self.bytes_per_block()
        num_blocks = min(max(budget_bytes // per, 0), max_useful_blocks)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds no block of {per} bytes; "
                             "raise kv_cache_memory / gpu_memory_utilization")
        shape = self.hal.kv_cache_shape(num_blocks, self.block_size, self.mc.num_kv_heads, self.mc.head_dim)
        # one allocation: layer l's cache is kv_cache[l] (a batch of blocks moves into every
        # layer in one call)
        self.kv_cache = torch.zeros((self.mc.num_layers, *shape), dtype=self.dtype, device=self.device)
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                    num_blocks * per / 2**20)
        return num_blocks

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """One worst-case step (a ``num_tokens`` prefill, ``num_seqs`` sampled rows) on a
        scratch KV cache, so device backends can measure peak activation memory."""
        bs = self.block_size
        nb = -(-num_tokens // bs)
        shape = self.hal.kv_cache_shape(nb, bs, self.mc.num_kv_heads, self.mc.head_dim)
        caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.mc.num_layers)]
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
                return self.model.compute_logits(self.model.forward(st["ids"][:b], st["pos"][:b],
                                                                    self.kv_caches, meta))

            graph = self.hal.capture_graph(step)
            if graph is None:
                return 0
            self.graphs[b] = graph
        self._capture_tail_graphs(max_blocks, max_model_len)
        return len(self.graphs)

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
                return self.model.compute_logits(hidden.index_select(0, st["last"]))

            graph = self.hal.capture_graph(step)
            if graph is None:
                return
            self.tail_graphs[b] = graph
            self._tail_meta[b] = meta
            if self.capture_verify:
                def verify(b=b, meta=meta, caches=caches):
                    return self.model.compute_logits(self.model.forward(st["ids"][:b], st["pos"][:b], caches, meta))

                graph = self.hal.capture_graph(verify)
                if graph is not None:
                    self.verify_graphs[b] = graph

    def _stage_graph(self, so: SchedulerOutput):
        """The captured step that runs ``so``, its inputs copied into its static buffers:
        (graph, rows it returns, whether it waits per layer on ``layer_events``), or None
        when ``so`` runs eagerly."""
        staged = self._stage_decode(so)
        return staged if staged is not None else self._stage_tail(so)

    def _stage_tail(self, so: SchedulerOutput):
        if not self.tail_graphs or len(so.scheduled) != 1:
            return None
        s = so.scheduled[0]
        seq, n = s.seq, s.num_new_tokens
        graphs = self.verify_graphs if s.spec_token_ids else self.tail_graphs  # a draft: every position
        if n < 2 or not graphs or n > max(graphs) or not s.samples or seq.params.prompt_logprobs is not None:
            return None
        b = min(x for x in graphs if x >= n)
        st, bs = self._tail, self.block_size
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        pad = b - n
        bt = seq.block_ids
        # padding rows: beyond the sequence's query length (no attention output read), a
        # valid position, and slot -1 (nothing written)
        toks = seq.token_ids[start:end] if not s.spec_token_ids else (seq.token_ids[start:] + s.spec_token_ids)[:end - start]
        st["ids"][:b].copy_(torch.tensor(toks + [0] * pad), non_blocking=True)
        st["pos"][:b].copy_(torch.tensor(list(range(start, end)) + [end - 1] * pad), non_blocking=True)
        st["slots"][:b].copy_(torch.tensor([bt[p // bs] * bs + p % bs for p in range(start, end)] + [-1] * pad),
                              non_blocking=True)
        st["seq_lens"].copy_(torch.tensor([end], dtype=torch.int32), non_blocking=True)
        st["cu"].copy_(torch.tensor([0, n], dtype=torch.int32), non_blocking=True)
        st["last"].copy_(torch.tensor([n - 1]), non_blocking=True)
        # columns past the table keep stale but valid block ids: nothing reads past seq_len
        st["tables"][0, :len(bt)].copy_(torch.tensor(bt, dtype=torch.int32), non_blocking=True)
        # a captured graph ignores the host lengths; a backend whose 'graph' calls the step
        # again reads them, so they are kept true
        meta = self._tail_meta[b]
        meta.query_lens_host[0], meta.seq_lens_host[0] = n, end
        return graphs[b], (n if s.spec_token_ids else 1), True

    def _stage_decode(self, so: SchedulerOutput):
        n = len(so.scheduled)
        if not self.graphs or so.num_decodes != n or n > max(self.graphs):
            return None
        b = min(x for x in self.graphs if x >= n)
        st, bs = self._static, self.block_size
        ids, pos, slots, lens = [], [], [], []
        width = max(len(s.seq.block_ids) for s in so.scheduled)
        rows = []
        for s in so.scheduled:
            seq = s.seq
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_ids[p // bs] * bs + p % bs)
            lens.append(p + 1)
            rows.append(seq.block_ids + [0] * (width - len(seq.block_ids)))
        pad = b - n
        rows.extend([[0] * width] * pad)
        # columns past `width` keep stale but valid block ids: nothing reads past seq_lens
        st["ids"][:b].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        st["pos"][:b].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        st["slots"][:b].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        st["seq_lens"][:b].copy_(torch.tensor(lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        st["tables"][:b, :width].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        return self.graphs[b], n, False  # decode graphs wait on no layer (hot path)

    # ---- one step -----------------------------------------------------------------------------
    def _prepare(self, so: SchedulerOutput):
        bs = self.block_size
        input_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        for s in so.scheduled:
            seq = s.seq
            start = seq.num_computed_tokens
            end = start + s.num_new_tokens
            # a draft's tokens follow the last real one (engine/spec)
            input_ids.extend(seq.token_ids[start:end] if not s.spec_token_ids
                             else (seq.token_ids[start:] + s.spec_token_ids)[:end - start])
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
        max_blocks = max(len(s.seq.block_ids) for s in so.scheduled)
        table = [s.seq.block_ids + [0] * (max_blocks - len(s.seq.block_ids)) for s in so.scheduled]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        # every token's position and slot at once (numpy), not a Python loop a token: a long
        # prefill chunk costs the host microseconds, not milliseconds
        q = np.asarray(query_lens)
        row = np.repeat(np.arange(len(q)), q)
        positions = np.arange(cu[-1]) - np.repeat(np.asarray(cu[:-1]) - (np.asarray(seq_lens) - q), q)
        tbl = np.asarray(table, dtype=np.int32)
        slots = tbl[row, positions // bs].astype(np.int64) * bs + positions % bs
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(tbl).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev),
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(seq_lens),
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
            block_size=bs,
            num_decode_seqs=so.num_decodes,
            sliding_window=getattr(self.mc, "sliding_window", None),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.from_numpy(positions).to(dev)
        return ids, pos, meta, cu

    def save_blocks(self, blocks: list) -> None:
        """Newly committed blocks to the connector's store: queued, and copied off the device
        at the start of the next step (or a flush), so that a step's outputs do not wait."""
        self.connector.save_kv(self.kv_caches, blocks)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> StepResult:
        if not so.kv_loads:
            return self._execute(so, self._stage_graph(so))
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

    def _execute(self, so: SchedulerOutput, staged=None, prepared=None, events=None) -> StepResult:
        rows_idx = [i for i, s in enumerate(so.scheduled) if s.samples]
        plp = None
        if staged is not None:
            graph, n, _ = staged
            logits = graph.replay()[:n].float().clone()  # the graph's output buffer is reused next step
            _, rows, spans = scored_rows(so, rows_idx, None)
        else:
            ids, pos, meta, cu = prepared or self._prepare(so)
            caches = self.kv_caches if events is None else LayerWaits(self.kv_caches, events)
            hidden = self.model.forward(ids, pos, caches, meta)
            plp = self._prompt_logprobs(so, hidden, cu)
            if not rows_idx:
                return StepResult([], [], plp)
            # every position of a draft is scored in this one forward (engine/spec/verify.py)
            picked, rows, spans = scored_rows(so, rows_idx, cu)
            last = torch.tensor(picked, dtype=torch.int64, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, last)).float()
        want_lp = [r.params.logprobs is not None for r in rows]
        raw = logits.clone() if any(want_lp) else None
        tokens = sample(self.hal, logits, rows)
        lp_out: list = [None] * len(rows)
        if raw is not None:
            k = max(r.params.logprobs or 0 for r in rows)
            chosen, rank, top_ids, top_lp = compute_logprobs(raw, tokens, k)
            chosen, rank, top_ids, top_lp = chosen.tolist(), rank.tolist(), top_ids.tolist(), top_lp.tolist()
            for j, r in enumerate(rows):
                if want_lp[j]:
                    n = r.params.logprobs
                    lp_out[j] = (chosen[j], rank[j], top_ids[j][:n], top_lp[j][:n])
        tokens = tokens.tolist()
        if len(rows) == len(rows_idx):
            return StepResult(tokens, lp_out, plp)
        first, first_lp, spec = row_results(so, rows_idx, spans, tokens, lp_out)
        return StepResult(first, first_lp, plp, spec)

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
