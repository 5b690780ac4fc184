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

Staging (the host's share of every verify step, between one replay and the next): the
graphs' static inputs and the step's sampling state (a value a scored position) are views of
ONE device buffer, mirrored by page-locked host buffers of the same layout. A step writes
its values into a mirror in place (numpy, a call per field, none per token) and goes up in
one copy of the mirror's used prefix: no tensor made, split or copied on the device a step.
"""
from __future__ import annotations

import numpy as np
import torch

from halserve.hal.interface import AttentionMetadata

# the largest bucket's activations and float logits (tokens x vocab) live in the graph pool
# next to the KV cache, outside the profile run's measure: bounded in tokens
MAX_VERIFY_TOKENS = 4096

# the packed layout: (name, dtype, length in units of (token slots, rows, table cells));
# the block tables last, so that a step copies the prefix up to its rows' tables
_I64 = ("ids", "pos", "slots", "seeds", "steps")  # a token slot each
_F32 = ("temp", "top_p", "min_p")  # a token slot each
_I32 = ("top_k",)  # a token slot each; then cu (rows + 1), seq_lens (rows), tables (rows x blocks)


class _Layout:
    """Byte offsets of every field in the packed buffer (each 64-byte aligned)."""

    def __init__(self, tmax: int, rows: int, max_blocks: int):
        fields = [(f, np.int64, tmax) for f in _I64] + [(f, np.float32, tmax) for f in _F32] \
            + [(f, np.int32, tmax) for f in _I32] \
            + [("cu", np.int32, rows + 1), ("seq_lens", np.int32, rows), ("tables", np.int32, rows * max_blocks)]
        self.fields, off = {}, 0
        for name, dt, n in fields:
            self.fields[name] = (off, np.dtype(dt), n)
            off += -(-(n * np.dtype(dt).itemsize) // 64) * 64
        self.nbytes, self.max_blocks = off, max_blocks

    def views(self, buf, torch_side: bool) -> dict:
        out = {}
        for name, (off, dt, n) in self.fields.items():
            raw = buf[off:off + n * dt.itemsize]
            out[name] = raw.view(_TORCH[dt]) if torch_side else raw.view(dt)
        out["tables"] = out["tables"].reshape(-1, self.max_blocks)
        return out

    def used(self, rows: int) -> int:
        """Bytes to copy for a step of ``rows`` rows: up to the end of their tables."""
        off, dt, _ = self.fields["tables"]
        return off + rows * self.max_blocks * dt.itemsize


_TORCH = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}


class VerifyGraphs:
    def __init__(self, runner, k: int):
        self.runner, self.width = runner, k + 1
        self.graphs: dict[int, object] = {}
        self._st: dict[str, torch.Tensor] = {}  # device views of the packed buffer
        self._host: list = []  # two (page-locked buffer, numpy views): a step's copy may be queued
        self._meta: dict[int, AttentionMetadata] = {}
        self._layout: _Layout | None = None
        self._dev: torch.Tensor | None = None

    def buckets(self, max_num_seqs: int) -> list[int]:
        return [b for b in self.runner.graph_buckets(max_num_seqs) if b * self.width <= MAX_VERIFY_TOKENS]

    def capture(self, max_num_seqs: int, max_blocks: int, max_model_len: int, with_hidden: bool) -> None:
        """One graph per bucket, largest first (the smaller ones reuse its pool memory)."""
        from tqdm import tqdm

        r, w = self.runner, self.width
        dev, buckets = r.device, self.buckets(max_num_seqs)
        if not buckets:
            return
        bmax = buckets[-1]
        tmax = bmax * w
        lay = self._layout = _Layout(tmax, bmax, max_blocks)
        self._dev = torch.zeros(lay.nbytes, dtype=torch.uint8, device=dev)
        st = self._st = lay.views(self._dev, torch_side=True)
        st["pos"].copy_(torch.arange(tmax, dtype=torch.int64) % w)
        st["slots"].fill_(-1)
        st["seq_lens"].fill_(w)
        st["cu"].copy_(torch.arange(0, tmax + 1, w, dtype=torch.int32))
        for _ in range(2):
            buf = r.hal.empty_host((lay.nbytes,), torch.uint8)
            buf.zero_()
            self._host.append((buf, lay.views(buf.numpy(), torch_side=False)))
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
        """(graph, real tokens, False (no per-layer waits), the sampling views (temperature,
        top-k, top-p, min-p, seed, step of every scored position, as
        ``spec.verify.position_arrays`` orders them), cu of the rows) with ``so``'s inputs in
        the static buffers, or None where ``so`` is not a verify step a graph covers.
        ``extra``: not taken (a verify step's sampling state is staged here)."""
        if extra:
            raise ValueError("VerifyGraphs.stage stages a step's sampling state itself; extra arrays are not taken")
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
        r, bs = self.runner, self.runner.block_size
        self._host.reverse()
        buf, h = self._host[0]
        seqs = [s.seq for s in sch]
        ps = [seq.params for seq in seqs]
        q = np.fromiter((s.num_new_tokens for s in sch), dtype=np.int64, count=n)
        start = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int64, count=n)
        cu = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(q, out=cu[1:n + 1])
        cu[n + 1:] = cu[n]
        real = int(cu[n])
        ids, pos, slots = h["ids"], h["pos"], h["slots"]
        for i, s in enumerate(sch):  # the last real token, then the draft
            ids[cu[i]] = s.seq.token_ids[start[i]]
            ids[cu[i] + 1:cu[i + 1]] = s.spec_token_ids
        t = b * w
        ids[real:t] = 0
        row = np.repeat(np.arange(n), q)
        within = np.arange(real) - cu[row]
        pos[:real] = start[row] + within
        pos[real:t] = 0
        tbl = r.tables.gather(seqs, n)
        slots[:real] = tbl[row, pos[:real] // bs].astype(np.int64) * bs + pos[:real] % bs
        slots[real:t] = -1
        h["cu"][:b + 1] = cu
        lens = h["seq_lens"]
        lens[:n] = start + q
        lens[n:b] = 0
        # columns past the table's width keep stale but valid block ids: nothing reads past seq_lens
        h["tables"][:n, :tbl.shape[1]] = tbl
        # the draws: every scored position sampled as a plain step of its own (spec/verify.py)
        h["temp"][:real] = np.fromiter((0.0 if p.greedy else p.temperature for p in ps), np.float32, n)[row]
        h["top_k"][:real] = np.fromiter((p.top_k for p in ps), np.int32, n)[row]
        h["top_p"][:real] = np.fromiter((p.top_p for p in ps), np.float32, n)[row]
        h["min_p"][:real] = np.fromiter((p.min_p for p in ps), np.float32, n)[row]
        h["seeds"][:real] = np.fromiter((seq.seed for seq in seqs), np.int64, n)[row]
        h["steps"][:real] = np.fromiter((seq.num_output_tokens for seq in seqs), np.int64, n)[row] + within
        used = self._layout.used(b)
        dev = self._st
        # one copy: the mirror's prefix onto the device buffer the graphs read
        self._dev[:used].copy_(buf[:used], non_blocking=True)
        # a captured graph ignores the host lengths; a backend whose 'graph' calls the step
        # again reads them, so they are kept true
        meta = self._meta[b]
        meta.query_lens_host[:] = (cu[1:] - cu[:-1]).tolist()
        meta.seq_lens_host[:] = lens[:b].tolist()
        views = (dev["temp"][:real], dev["top_k"][:real], dev["top_p"][:real], dev["min_p"][:real],
                 dev["seeds"][:real], dev["steps"][:real])
        return self.graphs[b], real, False, views, cu[:n + 1].tolist()
