"""A draft model: a smaller checkpoint with the target's tokenizer drafts k tokens greedily,
one batched forward per draft position.

Its KV lives in the target's block pool (``draft_batch.DraftKV``). What differs from the
target's is how far it is valid: the draft's KV of a sequence is trusted up to
``_valid[seq_id]`` (positions written with tokens the target kept), and recomputed from
there (a catch-up chunk) before drafting. A sequence that is new or was preempted starts
from 0: its blocks may come from the prefix cache, whose draft half nobody vouches for
(recomputing it writes the same values).

Each draft position's argmax stays on the device as the next position's input: the host
reads the k drafts once, after the last forward.
"""
from __future__ import annotations

import logging

import torch

from halserve.engine.spec.draft_batch import DraftKV, DraftRow, draft_batch
from halserve.engine.spec.proposer import Proposer

logger = logging.getLogger("halserve")


class DraftModelProposer(Proposer):
    name = "draft_model"

    def __init__(self, config, vocab_size, *, hal, target_config, block_size: int, device, **_):
        super().__init__(config, vocab_size)
        from halserve.models.loader import load_model

        dtype = target_config.dtype if config.draft_dtype == "auto" else config.draft_dtype
        self.model, self.mc = load_model(config.model, hal, dtype=dtype)
        if self.mc.vocab_size != vocab_size:
            raise ValueError(f"speculative_config model={config.model!r} has vocab_size {self.mc.vocab_size}; "
                             f"a draft model must share the target's tokenizer (vocab_size {vocab_size})")
        self.block_size, self.device = block_size, device
        self.kv = DraftKV(hal, block_size, self.mc.num_layers, self.mc.num_kv_heads, self.mc.head_dim,
                          self.mc.dtype, device)
        self._valid: dict[int, tuple[int, int]] = {}  # seq_id -> (preemption count, valid KV tokens)
        logger.info("speculative decoding: draft model %s (%s, %d layers), k=%d", config.model,
                    self.mc.architecture, self.mc.num_layers, self.k)

    def bytes_per_block(self) -> int:
        return self.kv.bytes_per_block()

    def allocate(self, num_blocks: int) -> None:
        self.kv.allocate(num_blocks)

    def verified(self, seq, num_valid):
        st = self._valid.get(seq.seq_id)
        if st is not None:
            self._valid[seq.seq_id] = (st[0], min(st[1], num_valid))

    def finished(self, seq):
        self._valid.pop(seq.seq_id, None)

    @torch.inference_mode()
    def propose(self, seqs, ks):
        limit = self.mc.max_position_embeddings
        out: list[list[int]] = [[] for _ in seqs]
        live = []
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            last = seq.num_tokens - 1  # the last real token's position
            k = min(k, limit - last)
            if k <= 0:
                continue
            epoch, valid = self._valid.get(seq.seq_id, (seq.num_preemptions, 0))
            start = min(valid, last) if epoch == seq.num_preemptions else 0
            live.append((i, seq, k, last, start))
        if not live:
            return out
        # single-token catch-ups first (the metadata's decode prefix); the order is kept after
        live.sort(key=lambda r: r[3] - r[4] != 0)
        # draft 1: catch up from the first invalid position through the last real token
        ids = [t for _, seq, _, last, start in live for t in seq.token_ids[start:last + 1]]
        rows = [DraftRow(seq.block_ids, start, last + 1 - start) for _, seq, _, last, start in live]
        toks = [self._forward(torch.tensor(ids, dtype=torch.int64, device=self.device), rows)]
        # drafts 2..k: one token a row at positions last+1.. (blocks for them are allocated:
        # the scheduler reserved last+k+1 tokens); a row whose k is done rides along unwritten
        for j in range(1, max(k for _, _, k, _, _ in live)):
            rows = [DraftRow(seq.block_ids, last + j, 1, write=k > j) for _, seq, k, last, _ in live]
            toks.append(self._forward(toks[-1], rows))
        drafted = torch.stack(toks, 1).tolist()  # the one device -> host read
        for (i, seq, k, last, _), d in zip(live, drafted):
            out[i] = d[:k]
            self._valid[seq.seq_id] = (seq.num_preemptions, last + k)
        return out

    def _forward(self, ids: torch.Tensor, rows: list[DraftRow]) -> torch.Tensor:
        """The argmax after each row's last token (on the device)."""
        pos, meta, last = draft_batch(rows, self.block_size, self.device, self.mc.max_position_embeddings,
                                      getattr(self.mc, "sliding_window", None))
        hidden = self.model.forward(ids, pos, self.kv.caches, meta)
        return self.model.compute_logits(hidden.index_select(0, last)).argmax(dim=-1)
