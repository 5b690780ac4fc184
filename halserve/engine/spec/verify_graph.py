"""Captured verify steps: a step whose every row is a decoding sequence with up to k draft
tokens (the common speculative step, vLLM's "uniform decode" graphs) replays a graph
bucketed by batch size that returns every position's logits.

Bucket b holds b rows of up to ``width = k + 1`` query tokens each: ``b * width`` token
slots. The real rows' tokens are packed from slot 0 (row i at ``cu[i]:cu[i+1]``, so a row
with a shorter draft, or none, fits too); padding rows have no query token (``cu`` repeats)
and read no key, and the slots after the last real token write to slot -1 at position 0,
their outputs unread. A bucket's shapes do not depend on the draft lengths, so in bf16 a
row computes the same numbers whatever its draft's length (what a proposer that drafts the
target's own continuation relies on).
"""
from __future__ import annotations

import numpy as np
import torch

from halserve.hal.interface import AttentionMetadata

# the largest bucket's activations and float logits (tokens x vocab) live in the graph pool
# next to the KV cache, outside the profile run's measure: bounded in tokens
MAX_VERIFY_TOKENS = 4096


class VerifyGraphs:
    def __init__(self, runner, k: int):
        self.runner, self.width = runner, k + 1
        self.graphs: dict[int, object] = {}
        self._st: dict[str, torch.Tensor] = {}
        self._meta: dict[int, AttentionMetadata] = {}

    def buckets(self, max_num_seqs: int) -> list[int]:
        return [b for b in self.runner.graph_buckets(max_num_seqs) if b * self.width <= MAX_VERIFY_TOKENS]

    def capture(self, max_num_seqs: int, max_blocks: int, max_model_len: int, with_hidden: bool) -> None:
        """One graph per bucket, largest first (the smaller ones reuse its pool memory)."""
        from tqdm import tqdm

        r, w = self.runner, self.width
        dev, buckets = r.device, self.buckets(max_num_seqs)
        if not buckets:
            return
        tmax = buckets[-1] * w
        st = self._st = {
            "ids": torch.zeros(tmax, dtype=torch.int64, device=dev),
            "pos": torch.arange(tmax, dtype=torch.int64, device=dev) % w,
            "slots": torch.full((tmax,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.full((buckets[-1],), w, dtype=torch.int32, device=dev),
            "tables": torch.zeros(buckets[-1], max_blocks, dtype=torch.int32, device=dev),
            "cu": torch.arange(0, tmax + 1, w, dtype=torch.int32, device=dev),
        }
        for b in tqdm(buckets[::-1], desc=f"capturing verify graphs (k={w - 1})", unit="graph"):
            t = b * w
            meta = AttentionMetadata(
                cu_seqlens_q=st["cu"][:b + 1], seq_lens=st["seq_lens"][:b], block_tables=st["tables"][:b],
                slot_mapping=st["slots"][:t], max_seqlen_q=w, max_seqlen_k=max_model_len,
                query_lens_host=[w] * b, seq_lens_host=[max_model_len] * b, block_size=r.block_size,
                num_decode_seqs=0, sliding_window=getattr(r.mc, "sliding_window", None))

            def step(t=t, meta=meta):
                hidden = r.model.forward(st["ids"][:t], st["pos"][:t], r.kv_caches, meta)
                logits = r.model.compute_logits(hidden)
                return (logits, hidden) if with_hidden else logits

            graph = r.hal.capture_graph(step)
            if graph is None:
                return
            self.graphs[b] = graph
            self._meta[b] = meta

    def stage(self, so, extra: tuple = ()):
        """(graph, real tokens, False (no per-layer waits), ``extra``'s device views, cu of
        the rows) with ``so``'s inputs in the static buffers, or None where ``so`` is not a
        verify step a graph covers."""
        sch = so.scheduled
        n = len(sch)
        if not self.graphs or n > max(self.graphs) or not any(s.spec_token_ids for s in sch):
            return None
        w = self.width
        for s in sch:
            if s.num_new_tokens != 1 + len(s.spec_token_ids) or s.num_new_tokens > w or not s.samples \
                    or s.seq.params.prompt_logprobs is not None:
                return None
        b = min(x for x in self.graphs if x >= n)
        r, st, bs = self.runner, self._st, self.runner.block_size
        seqs = [s.seq for s in sch]
        q = np.fromiter((s.num_new_tokens for s in sch), dtype=np.int64, count=n)
        start = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int64, count=n)
        cu = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(q, out=cu[1:n + 1])
        cu[n + 1:] = cu[n]
        real = int(cu[n])
        ids = np.zeros(b * w, dtype=np.int64)
        for i, s in enumerate(sch):  # the last real token, then the draft
            ids[cu[i]] = s.seq.token_ids[start[i]]
            ids[cu[i] + 1:cu[i + 1]] = s.spec_token_ids
        pos = np.zeros(b * w, dtype=np.int64)
        pos[:real] = np.arange(real) - np.repeat(cu[:n] - start, q)
        tbl = r.tables.gather(seqs, b)
        slots = np.full(b * w, -1, dtype=np.int64)
        slots[:real] = tbl[np.repeat(np.arange(n), q), pos[:real] // bs].astype(np.int64) * bs + pos[:real] % bs
        lens = np.zeros(b, dtype=np.int32)
        lens[:n] = start + q
        views = r.staging.upload(ids, pos, slots, cu.astype(np.int32), lens, tbl, *extra)
        for key, v in zip(("ids", "pos", "slots", "cu", "seq_lens"), views[:5]):
            st[key][:v.numel()].copy_(v)
        # columns past the table's width keep stale but valid block ids: nothing reads past seq_lens
        st["tables"][:b, :tbl.shape[1]].copy_(views[5])
        # a captured graph ignores the host lengths; a backend whose 'graph' calls the step
        # again reads them, so they are kept true
        meta = self._meta[b]
        meta.query_lens_host[:] = (cu[1:] - cu[:-1]).tolist()
        meta.seq_lens_host[:] = lens.tolist()
        return self.graphs[b], real, False, views[6:], cu[:n + 1].tolist()
