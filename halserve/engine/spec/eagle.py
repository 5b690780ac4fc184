"""EAGLE draft heads as a proposer: ``speculative_config={"method": "eagle", "model": HEAD_DIR,
"num_speculative_tokens": k}`` (``halserve.models.eagle`` reads the head).

The head at position q needs the target's hidden state h_q and token q+1, so it runs one
position behind the target. The runner hands over the hidden states of every position a
step computed (``take_hidden``, its ``hidden_sink``); a sequence keeps those the head has
not consumed yet (a prefill chunk's are consumed in the same step: the head runs over the
chunk at once, as vLLM's does, so a long prompt's states are not held). Before drafting, a
catch-up chunk runs the head over positions ``valid..last-1`` (last: the last real token's
position) with the hidden states the target kept, and its output at last-1 gives draft 1;
drafts 2..k feed the head's own output back in, one position a forward, the argmax staying
on the device.

The head's KV lives in the target's block pool (``draft_batch.DraftKV``). Its context starts
where the target's hidden states start: position 0, or, after a prefix-cache hit (whose
positions the target never ran), the first block the target did compute. Those earlier
blocks are left out of the head's attention (its block table starts at that block), which
costs acceptance, never correctness. A preempted sequence starts over the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from halserve.engine.spec.draft_batch import DraftKV, DraftRow, draft_batch
from halserve.engine.spec.proposer import Proposer

logger = logging.getLogger("halserve")


@dataclass(slots=True)
class _State:
    epoch: int  # the sequence's preemption count when this context began
    origin: int  # first position of the head's context (a block boundary)
    valid: int  # the head's KV holds positions origin..valid-1 computed from kept tokens
    base: int  # position of hidden[0]
    hidden: torch.Tensor  # the target's hidden states of positions base.. not yet consumed


class EagleProposer(Proposer):
    name = "eagle"
    needs_hidden = True  # the engine routes the target's hidden states here (every step, captured or not)

    def __init__(self, config, vocab_size, *, hal, target_config, target_model, block_size: int, device, **_):
        super().__init__(config, vocab_size)
        from halserve.models.eagle import EagleHead

        self.head = EagleHead(config.model, hal, target_model, target_config, target_config.dtype)
        self.block_size, self.device, self.hal = block_size, device, hal
        self.hidden_size, self.dtype = target_config.hf_config["hidden_size"], target_config.dtype
        self.graphs = None  # drafts 2..k as captured graphs (eagle_graph.py), where the backend has them
        self.kv = DraftKV(hal, block_size, self.head.num_layers, self.head.num_kv_heads, self.head.head_dim,
                          target_config.dtype, device)
        self._state: dict[int, _State] = {}
        logger.info("speculative decoding: EAGLE head %s (%d layer(s)), k=%d", config.model,
                    self.head.num_layers, self.k)

    def bytes_per_block(self) -> int:
        return self.kv.bytes_per_block()

    def allocate(self, num_blocks: int) -> None:
        self.kv.allocate(num_blocks)

    def finished(self, seq):
        self._state.pop(seq.seq_id, None)

    def capture_graphs(self, buckets: list[int], max_model_len: int) -> None:
        from halserve.engine.spec.eagle_graph import HeadGraphs

        g = HeadGraphs(self.head, self.kv, self.hal, self.block_size, self.device)
        try:
            g.capture(buckets, max_model_len, self.hidden_size, self.dtype)
        except Exception as e:  # noqa: BLE001 - the eager drafting path serves the same drafts
            logger.warning("EAGLE head: drafting graphs not captured (%s: %s); its forwards run eagerly",
                           type(e).__name__, e)
            g.graphs = {}
        self.graphs = g if g.graphs else None

    def take_hidden(self, so, hidden: torch.Tensor, cu: list[int]) -> None:
        """The runner's step ``so`` computed ``hidden`` (rows ``cu[i]:cu[i+1]`` for its row i,
        positions from the sequence's ``num_computed_tokens``); rows past what the target
        keeps (rejected drafts) are cut when they are read."""
        bs = self.block_size
        for i, s in enumerate(so.scheduled):
            seq, rows = s.seq, hidden[cu[i]:cu[i + 1]]
            start = seq.num_computed_tokens
            st = self._state.get(seq.seq_id)
            end = None if st is None else st.base + len(st.hidden)
            if st is None or st.epoch != seq.num_preemptions or start < st.valid or start > end:
                # a new context: the first block boundary from which the target's states are known
                origin = -(-start // bs) * bs
                self._state[seq.seq_id] = _State(seq.num_preemptions, origin, origin, origin, rows[origin - start:])
            else:
                st.hidden = torch.cat((st.hidden[:start - st.base], rows))
        self._consume_prefill(so)

    def _consume_prefill(self, so) -> None:
        """Prefill chunks: run the head over their positions now (every one is kept, and the
        token after each is known but for the chunk's last), so that a long prompt's hidden
        states are not held until its first draft. Only the head's KV is wanted here."""
        rows, ids, hid = [], [], []
        for s in so.scheduled:
            st = self._state.get(s.seq.seq_id)
            if s.spec_token_ids or s.num_new_tokens < 2 or st is None:
                continue
            seq = s.seq
            stop = min(st.base + len(st.hidden), seq.num_tokens - 1)  # position stop-1 reads token stop
            if stop - st.valid < 2:
                continue
            rows.append(DraftRow(seq.block_ids, st.valid, stop - st.valid, st.origin))
            ids += seq.token_ids[st.valid + 1:stop + 1]
            hid.append(st.hidden[st.valid - st.base:stop - st.base])
            # consumed; the state at stop-1 stays for a rerun there (a copy: a view would keep
            # the whole step's hidden states alive)
            st.hidden, st.base, st.valid = st.hidden[stop - 1 - st.base:].clone(), stop - 1, stop
        if rows:
            pos, meta, _ = draft_batch(rows, self.block_size, self.device, self.head.max_position_embeddings)
            self.head.forward(torch.tensor(ids, dtype=torch.int64, device=self.device), pos, torch.cat(hid),
                              self.kv.caches, meta)

    @torch.inference_mode()
    def propose(self, seqs, ks):
        limit = self.head.max_position_embeddings
        out: list[list[int]] = [[] for _ in seqs]
        live = []
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            last = seq.num_tokens - 1  # the last real token's position
            st = self._state.get(seq.seq_id)
            k = min(k, limit - last + 1)
            if st is None or st.epoch != seq.num_preemptions or k <= 0:
                continue
            # the head's output at last-1 gives draft 1: rerun it there when it already ran
            start = min(st.valid, last - 1)
            if start < max(st.origin, st.base) or st.base + len(st.hidden) < last:
                continue  # no context yet (e.g. a prompt that is all cache hits), or states missing
            live.append((i, seq, k, last, start, st))
        if not live:
            return out
        live.sort(key=lambda r: r[3] - r[4] != 1)  # single-token catch-ups first; kept after
        # catch-up: positions start..last-1, tokens start+1..last, the target's states there
        ids = torch.tensor([t for _, seq, _, last, start, _ in live for t in seq.token_ids[start + 1:last + 1]],
                           dtype=torch.int64, device=self.device)
        hid = torch.cat([st.hidden[start - st.base:last - st.base] for _, _, _, last, start, st in live])
        rows = [DraftRow(seq.block_ids, start, last - start, st.origin) for _, seq, _, last, start, st in live]
        tok, h = self._forward(ids, hid, rows)
        toks = [tok]
        for _, seq, _, last, _, st in live:
            # consumed; the state at last-1 stays for a rerun there
            st.hidden, st.base, st.valid = st.hidden[last - 1 - st.base:last - st.base], last - 1, last
        # drafts 2..k at positions last.. (the scheduler reserved blocks through last+k); a row
        # whose k is done rides along unwritten
        steps = [[DraftRow(seq.block_ids, last - 1 + j, 1, st.origin, write=k > j)
                  for _, seq, k, last, _, st in live] for j in range(1, max(k for _, _, k, _, _, _ in live))]
        rest = self.graphs.draft(tok, h, steps, limit) if steps and self.graphs is not None else None
        if rest is None:
            rest = []
            for rows in steps:
                tok, h = self._forward(tok, h, rows)
                rest.append(tok)
        toks += rest
        drafted = torch.stack(toks, 1).tolist()  # the one device -> host read
        for (i, _, k, _, _, _), d in zip(live, drafted):
            out[i] = d[:k]
        return out

    def _forward(self, ids, hidden, rows):
        """(argmax after each row's last token, the head's output there), on the device."""
        pos, meta, last = draft_batch(rows, self.block_size, self.device, self.head.max_position_embeddings)
        fed, normed = self.head.forward(ids, pos, hidden, self.kv.caches, meta)
        logits = self.head.compute_logits(normed.index_select(0, last))
        return logits.argmax(dim=-1), fed.index_select(0, last)
