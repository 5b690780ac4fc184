"""Continuous batching under a token budget: decodes first, then chunked prefills;
preemption by recompute when blocks run out. Pure Python, no device code.

KV blocks outside the device come through a KV connector (``engine.kv_connector``; the
offload tiers are one), and the scheduler knows only its interface. A waiting sequence
whose prefix continues in the connector's store is admitted with blocks for it: loaded
within the step (synchronous) or, asynchronously, the sequence goes to ``loading`` and holds
its blocks while the others keep running. Once its load has finished the loaded blocks join
the prefix cache and the sequence waits again at the front, still holding them (nothing
can evict them meanwhile), and runs from where they end.

Every sequence is one case: it has ``num_computed_tokens`` of ``num_tokens`` in the KV
cache, and a step computes the next ``num_new_tokens`` of them (1 for a decode, a chunk for
a prefill). A step that reaches the last token samples.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from halserve.engine.kv_cache import KVCacheManager, block_tokens
from halserve.engine.kv_connector import KVConnector
from halserve.engine.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # with a draft: 1 + len(spec_token_ids)
    spec_slots: int = 0  # draft tokens its blocks and the token budget were reserved for
    spec_token_ids: list[int] = field(default_factory=list)  # the draft it verifies (engine/spec)

    @property
    def samples(self) -> bool:
        seq = self.seq  # read a few times a row every step: no nested property
        return seq.num_computed_tokens + self.num_new_tokens - len(self.spec_token_ids) == len(seq.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first
    preempted: list[Sequence] = field(default_factory=list)
    num_decodes: int = 0
    # the connector's synchronous loads, copied in by the runner (``start_load_kv``) before
    # the forward that reads them
    kv_loads: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 connector: KVConnector | None = None):
        self.kv = kv
        self.connector = connector or KVConnector()
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: list[Sequence] = []  # their KV is being loaded by the connector
        # speculative decoding: seq -> most draft tokens worth verifying after its next token
        # (engine/spec); None: off
        self.spec_limit = None
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.loading:
            self.loading.remove(seq)
            self.connector.request_finished(seq)  # waits for copies in flight into its blocks
        self.kv.free(seq)

    def _finish_loads(self) -> None:
        """Sequences whose asynchronous load is done: the loaded blocks become cached blocks,
        and the sequence waits again at the front, holding its prefix (the device hit and the
        blocks loaded; those that failed to load go back), its KV computed that far."""
        back = []
        for done in self.connector.get_finished_loads():
            seq, ids, n = done.seq, done.block_ids, done.num_loaded
            seq.load_failed = done.failed  # else a retry would find the same blocks and fail again
            start = len(seq.block_ids) - len(ids)
            self._register(seq, start, ids[:n])
            for bid in reversed(ids[n:]):  # nothing usable in them
                self.kv.release(bid)
            held = start + n
            del seq.block_ids[held:]
            seq.num_computed_tokens = seq.num_cached_tokens = held * self.kv.block_size
            seq.num_committed_blocks = held
            self.loading.remove(seq)
            seq.status = SeqStatus.WAITING
            back.append(seq)
        self.waiting.extendleft(reversed(back))

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _register(self, seq: Sequence, start: int, block_ids: list[int]) -> None:
        """Blocks the connector filled with ``seq``'s blocks ``start...`` join the prefix cache."""
        tokens = block_tokens(seq, start, self.kv.block_size)
        for i, bid in enumerate(block_ids):
            self.kv.register_loaded(bid, seq.block_hashes[start + i], tokens(i))

    def _can_admit(self, hit: list[int], n: int) -> bool:
        """Whether ``n`` fresh blocks can be had besides the prefix ``hit`` (hits with no
        other holder sit in the free queue: they count against it too)."""
        return self.kv.can_allocate(n + sum(1 for b in hit if self.kv.blocks[b].ref_count == 0))

    def _start_load(self, seq: Sequence, hit: list[int], n: int) -> bool:
        """Admit waiting ``seq`` (the queue's head) to ``loading``: device blocks for its prefix
        hit plus ``n`` fresh ones the connector loads asynchronously. False (nothing held)
        when the blocks are short."""
        if not self._can_admit(hit, n):
            self.connector.update_state_after_alloc(seq, [], 0)
            return False
        self.kv.touch(hit)
        fresh = self.kv.allocate_fresh(n)  # after touch: the hits stay put
        seq.block_ids = list(hit) + fresh
        try:
            self.connector.update_state_after_alloc(seq, fresh, n * self.kv.block_size)
        except BaseException:  # nothing was copied into the blocks: the sequence just waits on
            self.kv.free(seq)
            raise
        self.waiting.popleft()
        seq.status = SeqStatus.LOADING
        self.loading.append(seq)
        return True

    def _admit_held(self, seq: Sequence, budget: int, out: SchedulerOutput, scheduled: set[int]) -> bool:
        """Admit the waiting queue's head that holds its prefix's blocks already (a load
        job's): the next chunk after them, if the blocks for it can be had."""
        computed = seq.num_computed_tokens
        n = min(seq.num_tokens - computed, budget)
        if not self.kv.can_allocate(self.kv.blocks_needed(computed + n) - len(seq.block_ids)):
            return False
        self.waiting.popleft()
        self.kv.record_lookup(seq, len(seq.block_ids))
        self._run(seq, n, out, scheduled)
        return True

    def _run(self, seq: Sequence, n: int, out: SchedulerOutput, scheduled: set[int]) -> None:
        """Admitted ``seq`` (out of the waiting queue, its computed prefix in its blocks)
        runs its next ``n`` tokens this step."""
        ok = self.kv.allocate(seq, seq.num_computed_tokens + n)
        assert ok
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        out.scheduled.append(ScheduledSeq(seq, n))
        scheduled.add(seq.seq_id)

    def _drop_holds(self) -> bool:
        """The queue's head cannot be admitted. If nothing runs or loads (nothing will free
        blocks), the other waiting sequences that hold a loaded prefix let it go (its blocks
        stay cached, so they may still hit when their turn comes): True if any did."""
        if self.running or self.loading:
            return False
        dropped = False
        for seq in list(self.waiting)[1:]:
            if seq.block_ids:
                self.kv.free(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                dropped = True
        return dropped

    def _reserve_drafts(self, out: SchedulerOutput, budget: int) -> int:
        """Room for draft tokens after each decode row's next token, from the token budget and
        free blocks left once everything else is scheduled: a draft never delays an admission
        nor preempts anyone. Returns the budget left."""
        for s in out.scheduled:
            if budget <= 0:
                break
            seq = s.seq
            if s.num_new_tokens != 1 or not s.samples:
                continue
            room = (len(seq.block_ids) + self.kv.num_free_blocks) * self.kv.block_size
            k = min(self.spec_limit(seq), budget, room - seq.num_computed_tokens - 1)
            if k > 0 and self.kv.allocate(seq, seq.num_computed_tokens + 1 + k):
                s.spec_slots = k
                budget -= k
        return budget

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.loading:
            self._finish_loads()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        # 1. running sequences: decodes first, then unfinished prefills, oldest first
        order = sorted(self.running, key=lambda s: len(s.token_ids) - s.num_computed_tokens != 1)
        for seq in order:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            if seq.num_pending and seq.params.max_tokens is not None \
                    and seq.num_output_tokens >= seq.params.max_tokens:
                continue  # async scheduling: its token in flight is its last (no wasted row)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, seq.num_computed_tokens + n):
                victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled), None)
                if victim is None:
                    break
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING or len(seq.block_ids) * self.kv.block_size < seq.num_computed_tokens + n:
                continue
            out.scheduled.append(ScheduledSeq(seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        # 2. waiting sequences, unless this step already had to preempt
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.block_ids:  # back from a load job, holding its prefix
                if not self._admit_held(seq, budget, out, scheduled):
                    if self._drop_holds():
                        continue
                    break
                budget -= out.scheduled[-1].num_new_tokens
                continue
            hit: list[int] = []
            num_loaded = 0  # blocks the connector holds past the device prefix hit
            # prompt_logprobs needs logits at every prompt position: no prefix-cache reuse
            if seq.num_computed_tokens == 0 and not seq.block_ids and seq.params.prompt_logprobs is None:
                hit = self.kv.match_prefix(seq)
                if self.kv.enable_prefix_caching:
                    match = self.connector.get_num_new_matched_tokens(seq, len(hit) * self.kv.block_size)
                    if match is None:  # being loaded for another sequence; running ones go on
                        break
                    num_loaded = match[0] // self.kv.block_size
                    if match[1]:
                        if self._start_load(seq, hit, num_loaded) or self._drop_holds():
                            continue
                        break
            computed = (len(hit) + num_loaded) * self.kv.block_size
            n = min(seq.num_tokens - computed, budget)
            need = self.kv.blocks_needed(computed + n) - len(hit)
            if not self._can_admit(hit, need):
                if num_loaded:
                    self.connector.update_state_after_alloc(seq, [], 0)
                if self._drop_holds():
                    continue
                break
            self.waiting.popleft()
            self.kv.touch(hit)
            self.kv.record_lookup(seq, len(hit))
            seq.block_ids = list(hit)
            if num_loaded:
                fresh = self.kv.allocate_fresh(num_loaded)  # after touch: the hits stay put
                self._register(seq, len(hit), fresh)
                seq.block_ids += fresh
                external = computed - len(hit) * self.kv.block_size
                out.kv_loads += self.connector.update_state_after_alloc(seq, fresh, external)
            seq.num_computed_tokens = computed
            seq.num_cached_tokens = computed
            self._run(seq, n, out, scheduled)
            budget -= n
        if self.spec_limit is not None and budget > 0:
            budget = self._reserve_drafts(out, budget)
        # the runner wants decode rows (one query token, sampling) first
        decode = [s.num_new_tokens == 1 and s.samples for s in out.scheduled]
        if not all(decode):  # a stable sort: decode rows first, each group in its order
            out.scheduled = [s for s, d in zip(out.scheduled, decode) if d] + \
                [s for s, d in zip(out.scheduled, decode) if not d]
        out.num_decodes = sum(decode)
        return out
