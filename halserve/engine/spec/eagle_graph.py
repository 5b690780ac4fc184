"""An EAGLE head's single-token drafting forwards (drafts 2..k) as captured graphs, one per
batch bucket: eagerly each is a one-layer decode step paying a launch a kernel and a few
host-to-device copies, which at batch 1 the host, not the device, bounds.

A bucket's static inputs are the fed-back token and hidden state, the position, slot, key
length and block table of each row; its outputs the argmax token and the head's state. The
positions, slots and key lengths of all k - 1 steps go up in one copy before the first;
between steps the outputs are copied into the inputs on the device. Padding rows are the
decode graphs' (position 0, slot -1, a one-key context in block 0), their outputs unread.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from halserve.engine.spec.draft_batch import DraftRow, host_batch
from halserve.hal.interface import AttentionMetadata

logger = logging.getLogger("halserve")


class HeadGraphs:
    def __init__(self, head, kv, hal, block_size: int, device):
        self.head, self.kv, self.hal, self.block_size, self.device = head, kv, hal, block_size, device
        self.graphs: dict[int, object] = {}
        self._meta: dict[int, AttentionMetadata] = {}
        self._st: dict[str, torch.Tensor] = {}

    def capture(self, buckets: list[int], max_model_len: int, hidden_size: int, dtype: torch.dtype) -> None:
        from tqdm import tqdm

        if not buckets:
            return
        dev, bmax = self.device, buckets[-1]
        max_blocks = -(-max_model_len // self.block_size)
        st = self._st = {
            "ids": torch.zeros(bmax, dtype=torch.int64, device=dev),
            "hidden": torch.zeros(bmax, hidden_size, dtype=dtype, device=dev),
            "pos": torch.zeros(bmax, dtype=torch.int64, device=dev),
            "slots": torch.full((bmax,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.ones(bmax, dtype=torch.int32, device=dev),
            "tables": torch.zeros(bmax, max_blocks, dtype=torch.int32, device=dev),
            "cu": torch.arange(bmax + 1, dtype=torch.int32, device=dev),
        }
        for b in tqdm(buckets[::-1], desc="capturing EAGLE draft graphs", unit="graph"):
            meta = AttentionMetadata(
                cu_seqlens_q=st["cu"][:b + 1], seq_lens=st["seq_lens"][:b], block_tables=st["tables"][:b],
                slot_mapping=st["slots"][:b], max_seqlen_q=1, max_seqlen_k=max_model_len,
                query_lens_host=[1] * b, seq_lens_host=[1] * b, block_size=self.block_size, num_decode_seqs=b)

            def step(b=b, meta=meta):
                fed, normed = self.head.forward(st["ids"][:b], st["pos"][:b], st["hidden"][:b], self.kv.caches, meta)
                return self.head.compute_logits(normed).argmax(dim=-1), fed

            graph = self.hal.capture_graph(step)
            if graph is None:
                return
            self.graphs[b] = graph
            self._meta[b] = meta

    def draft(self, tok: torch.Tensor, h: torch.Tensor, rows_of_step: list[list[DraftRow]],
              max_position: int) -> "list[torch.Tensor] | None":
        """Drafts 2..k: ``tok`` [n] and ``h`` [n, H] (draft 1 and the head's state there, on
        the device), ``rows_of_step[j]`` the rows of step j. None where no graph fits."""
        n = len(rows_of_step[0])
        fits = [b for b in self.graphs if b >= n]
        if not fits:
            return None
        b, st, steps = min(fits), self._st, len(rows_of_step)
        arr = np.zeros((3, steps, b), dtype=np.int64)  # position, slot, key length
        arr[1] = -1
        arr[2] = 1
        tables = None
        for j, rows in enumerate(rows_of_step):
            pos, slots, _, klens, tbls = host_batch(rows, self.block_size, max_position)
            arr[0, j, :n] = np.concatenate(pos)
            arr[1, j, :n] = np.concatenate(slots)
            arr[2, j, :n] = klens
            tables = tbls
        width = max(len(t) for t in tables)
        tbl = np.zeros((b, width), dtype=np.int32)
        for i, t in enumerate(tables):
            tbl[i, :len(t)] = t
        dev_arr = torch.from_numpy(arr).to(self.device, non_blocking=True)
        st["tables"][:b, :width].copy_(torch.from_numpy(tbl).to(self.device, non_blocking=True))
        meta = self._meta[b]
        out, toks = None, []
        for j in range(steps):
            st["ids"][:n].copy_(tok)
            st["hidden"][:n].copy_(h)
            st["pos"][:b].copy_(dev_arr[0, j])
            st["slots"][:b].copy_(dev_arr[1, j])
            st["seq_lens"][:b].copy_(dev_arr[2, j])
            # a captured graph ignores the host lengths; a backend whose 'graph' calls the
            # step again reads them
            meta.seq_lens_host[:] = arr[2, j].tolist()
            out = self.graphs[b].replay()
            tok, h = out[0][:n], out[1][:n]
            toks.append(tok.clone())  # the output buffer is rewritten by the next replay
        return toks
