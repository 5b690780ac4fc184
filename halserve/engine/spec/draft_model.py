"""A draft model: a smaller checkpoint with the target's tokenizer drafts k tokens greedily,
one batched forward per draft position.

Its KV lives in the target's block pool: block id b holds the target's KV in the target's
cache and the draft's in this one (same block size, same block tables), so the scheduler's
one allocation covers both and nothing about blocks is tracked twice. What differs is how
far each cache is valid: the draft's KV of a sequence is trusted up to ``_valid[seq_id]``
(positions written with tokens the target kept), and recomputed from there (a catch-up
chunk) before drafting. A sequence that is new or was preempted starts from 0: its blocks
may come from the prefix cache, whose draft half nobody vouches for (recomputing it writes
the same values).
"""
from __future__ import annotations

import logging

import torch

from halserve.engine.spec.proposer import Proposer
from halserve.hal.interface import AttentionMetadata

logger = logging.getLogger("halserve")


class DraftModelProposer(Proposer):
    name = "draft_model"

    def __init__(self, config, vocab_size, *, hal, target_config, block_size: int, device):
        super().__init__(config, vocab_size)
        from halserve.models.loader import load_model

        dtype = target_config.dtype if config.draft_dtype == "auto" else config.draft_dtype
        self.model, self.mc = load_model(config.model, hal, dtype=dtype)
        if self.mc.vocab_size != vocab_size:
            raise ValueError(f"speculative_config model={config.model!r} has vocab_size {self.mc.vocab_size}; "
                             f"a draft model must share the target's tokenizer (vocab_size {vocab_size})")
        self.hal, self.block_size, self.device = hal, block_size, device
        self.kv_caches: list[torch.Tensor] = []
        self._valid: dict[int, tuple[int, int]] = {}  # seq_id -> (preemption count, valid KV tokens)
        logger.info("speculative decoding: draft model %s (%s, %d layers), k=%d", config.model,
                    self.mc.architecture, self.mc.num_layers, self.k)

    def bytes_per_block(self) -> int:
        shape = self.hal.kv_cache_shape(1, self.block_size, self.mc.num_kv_heads, self.mc.head_dim)
        return (torch.Size(shape).numel() * self.mc.num_layers
                * torch.empty((), dtype=self.mc.dtype).element_size())

    def allocate(self, num_blocks: int) -> None:
        shape = self.hal.kv_cache_shape(num_blocks, self.block_size, self.mc.num_kv_heads, self.mc.head_dim)
        self.kv_cache = torch.zeros((self.mc.num_layers, *shape), dtype=self.mc.dtype, device=self.device)
        self.kv_caches = list(self.kv_cache.unbind(0))

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
        # draft 1: catch up from the first invalid position through the last real token
        rows = [(seq.block_ids, start, seq.token_ids[start:last + 1]) for _, seq, _, last, start in live]
        toks = self._forward(rows)
        for (i, seq, k, last, _), t in zip(live, toks):
            out[i].append(t)
            self._valid[seq.seq_id] = (seq.num_preemptions, last + 1)
        # drafts 2..k: one token a row at positions last+1.. (blocks for them are allocated:
        # the scheduler reserved last+k+1 tokens)
        for j in range(1, max(k for _, _, k, _, _ in live)):
            step = [(i, seq, last) for i, seq, k, last, _ in live if k > j]
            toks = self._forward([(seq.block_ids, last + j, [out[i][-1]]) for i, seq, last in step])
            for (i, seq, last), t in zip(step, toks):
                out[i].append(t)
                self._valid[seq.seq_id] = (seq.num_preemptions, last + j + 1)
        return out

    def _forward(self, rows: list[tuple[list[int], int, list[int]]]) -> list[int]:
        """Rows of (block table, first position, query tokens): the argmax after each row's
        last token. Single-token rows go first (the attention metadata's decode prefix)."""
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]) != 1)
        bs, dev = self.block_size, self.device
        ids, pos, slots, qlens, klens = [], [], [], [], []
        for r in order:
            bt, start, toks = rows[r]
            end = start + len(toks)
            ids += toks
            pos += range(start, end)
            slots += [bt[p // bs] * bs + p % bs for p in range(start, end)]
            qlens.append(len(toks))
            klens.append(end)
        width = max(len(rows[r][0]) for r in order)
        cu = [0]
        for q in qlens:
            cu.append(cu[-1] + q)
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(klens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([rows[r][0] + [0] * (width - len(rows[r][0])) for r in order],
                                      dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_seqlen_q=max(qlens), max_seqlen_k=max(klens), query_lens_host=qlens, seq_lens_host=klens,
            block_size=bs, num_decode_seqs=sum(1 for q in qlens if q == 1),
            sliding_window=getattr(self.mc, "sliding_window", None))
        hidden = self.model.forward(torch.tensor(ids, dtype=torch.int64, device=dev),
                                    torch.tensor(pos, dtype=torch.int64, device=dev), self.kv_caches, meta)
        last = torch.tensor(cu[1:], dtype=torch.int64, device=dev) - 1
        picked = self.model.compute_logits(hidden.index_select(0, last)).argmax(dim=-1).tolist()
        res = [0] * len(rows)
        for slot, r in enumerate(order):
            res[r] = picked[slot]
        return res
