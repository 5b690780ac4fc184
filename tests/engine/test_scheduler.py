"""The scheduler on its own (token budget, decode-first order, chunked prefill, preemption,
fairness), and with asynchronous KV connector loads against a fake offload manager (every
block it is asked for is on "disk", a job is done at its first poll): a sequence keeps the
blocks its job loaded, and sequences holding loaded prefixes never wedge the queue."""
from __future__ import annotations

from types import SimpleNamespace

from halserve.engine.kv_cache import KVCacheManager
from halserve.engine.kv_connector import OffloadConnector
from halserve.engine.offload import LookupResult
from halserve.engine.sampling import SamplingParams
from halserve.engine.scheduler import Scheduler
from halserve.engine.sequence import Sequence, SeqStatus

BS = 4


class FakeTiers:
    def __init__(self, on_disk: int):
        self.on_disk = on_disk  # how many leading blocks of a prompt are "on disk"

    def lookup(self, hashes, tokens):
        res = LookupResult()
        res.disk = list(hashes[:self.on_disk])
        return res

    def start_load(self, block_ids, found, tokens):
        job = SimpleNamespace(block_ids=list(block_ids), hashes=list(found.disk), failed=False,
                              expect=[tuple(tokens(i)) for i in range(len(found.disk))])
        found.disk = []
        return job

    def poll(self, job):
        return len(job.block_ids)

    def release(self, found):
        pass

    def cancel(self, job):
        pass


def seq(i: int, n: int) -> Sequence:
    return Sequence(i, str(i), 0, [(7 * i + t) % 50 + 1 for t in range(n)], n, SamplingParams(max_tokens=1), 0)


def test_a_loaded_prefix_is_held_until_it_runs():
    kv = KVCacheManager(40, BS)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100, connector=OffloadConnector(FakeTiers(on_disk=8), BS))
    a = seq(1, 33)
    sched.add(a)
    out = sched.schedule()
    assert out.empty and sched.loading == [a] and a.status is SeqStatus.LOADING
    loaded = list(a.block_ids)
    assert len(loaded) == 8
    out = sched.schedule()  # the job is done: a runs from block 8, on the blocks it loaded
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1)]
    assert a.block_ids[:8] == loaded and a.num_computed_tokens == 32 and a.num_cached_tokens == 32
    assert all(kv.cached[h] == b for h, b in zip(a.block_hashes[:8], loaded))  # and they are cached


def test_a_loaded_prefix_waiting_for_budget_cannot_be_evicted():
    """The job is done but another prefill takes the step's whole budget: the sequence
    waits holding its loaded blocks, out of the free queue (nothing can evict them)."""
    kv = KVCacheManager(40, BS)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=8, connector=OffloadConnector(FakeTiers(on_disk=8), BS))
    a = seq(1, 33)
    c = seq(3, 60)
    c.params = SamplingParams(max_tokens=1, prompt_logprobs=0)  # no prefix reuse: a plain prefill
    sched.add(a)
    sched.add(c)
    assert [s.seq for s in sched.schedule().scheduled] == [c] and sched.loading == [a]
    loaded = list(a.block_ids)
    c.num_computed_tokens += 8  # what the engine does after the step
    assert [s.seq for s in sched.schedule().scheduled] == [c]  # c's chunk takes the budget
    assert a.status is SeqStatus.WAITING and a.block_ids == loaded and a.num_computed_tokens == 32
    assert all(kv.blocks[b].ref_count == 1 and b not in kv.free_queue for b in loaded)


def test_held_prefixes_do_not_wedge_the_queue():
    """Two prompts load 4 blocks each into a 12-block cache; the first then needs 5 more
    and only 4 are free: the second lets its loaded blocks go (they stay cached) so the
    first runs, instead of both waiting for ever."""
    kv = KVCacheManager(12, BS)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100, connector=OffloadConnector(FakeTiers(on_disk=4), BS))
    a, b = seq(1, 33), seq(2, 33)
    sched.add(a)
    sched.add(b)
    assert sched.schedule().empty and sched.loading == [a, b] and kv.num_free_blocks == 4
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 17)]
    assert a.num_cached_tokens == 16 and len(a.block_ids) == 9
    assert b.status is SeqStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0


# ---- the scheduler on its own (no connector) ----------------------------------------------------

def plain(num_blocks: int, budget: int, max_seqs: int = 8) -> tuple[KVCacheManager, Scheduler]:
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=False)
    return kv, Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget)


def prompt(i: int, n: int, max_tokens: int) -> Sequence:
    s = seq(i, n)
    s.params = SamplingParams(max_tokens=max_tokens)
    return s


def advance(sched: Scheduler, out) -> list[Sequence]:
    """What the engine does after a step: the chunk is in the cache; a sampling row gets a
    token, and a sequence with all its tokens finishes. Returns those finished."""
    done = []
    for s in out.scheduled:
        q = s.seq
        samples = s.samples
        q.num_computed_tokens += s.num_new_tokens
        sched.kv.commit(q)
        if samples:
            q.token_ids.append(1)
            if q.num_output_tokens >= q.params.max_tokens:
                q.status = SeqStatus.FINISHED
                sched.remove(q)
                done.append(q)
    return done


def test_token_budget_and_chunked_prefill():
    """No step schedules more than the budget; a prompt longer than it runs in chunks that
    follow each other, and samples only on the chunk that reaches its end."""
    kv, sched = plain(64, budget=16)
    a = prompt(1, 40, 2)
    sched.add(a)
    chunks = []
    while a.status is not SeqStatus.FINISHED:
        out = sched.schedule()
        assert out.num_tokens <= 16
        chunks.append((a.num_computed_tokens, out.scheduled[0].num_new_tokens, out.scheduled[0].samples))
        advance(sched, out)
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True), (40, 1, True)]
    assert kv.num_free_blocks == 64  # all freed at the end


def test_decodes_go_first_and_prefills_share_what_is_left():
    """Running decodes are scheduled before any prefill chunk, and take one token of the
    budget each; a newly arrived prompt gets the rest, chunked."""
    kv, sched = plain(64, budget=10)
    a, b = prompt(1, 5, 8), prompt(2, 6, 8)
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())  # both prefills fit: 11 > 10, so b is chunked
    out = sched.schedule()
    c = prompt(3, 30, 1)
    sched.add(c)
    advance(sched, out)
    out = sched.schedule()
    rows = [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]
    decodes = [r for r in rows if r[1] == 1 and r[0] in (1, 2)]
    assert rows[:len(decodes)] == decodes and len(decodes) >= 1  # decodes first
    assert out.num_decodes == len(decodes)
    assert rows[-1][0] == 3 and rows[-1][1] == 10 - sum(n for _, n in rows[:-1])  # c takes the rest
    assert out.num_tokens == 10


def test_preemption_frees_the_newest_and_it_recomputes_first():
    """Two sequences decode in a cache that cannot hold both to the end: the newest one is
    preempted (its blocks freed, its KV recomputed later), goes to the front of the waiting
    queue, and both still finish with every token."""
    kv, sched = plain(6, budget=64, max_seqs=2)
    a, b = prompt(1, 8, 12), prompt(2, 8, 12)  # each grows to 20 tokens = 5 blocks
    c = prompt(3, 4, 1)  # arrived later: waits for a free row
    for s in (a, b, c):
        sched.add(s)
    finished, preempted = [], []
    for _ in range(200):
        out = sched.schedule()
        if out.preempted and not preempted:
            assert list(sched.waiting)[:2] == [b, c]  # the preempted one goes first
        preempted += out.preempted
        assert out.num_tokens <= 64
        assert sum(len(s.block_ids) for s in (a, b, c)) <= 6
        finished += advance(sched, out)
        if len(finished) == 3:
            break
    assert preempted and preempted[0] is b and b.num_preemptions >= 1 and a.num_preemptions == 0
    assert finished[0] is a and set(finished) == {a, b, c}  # b resumed, not starved
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert sched.num_preemptions == len(preempted) and kv.num_free_blocks == 6


def test_first_come_first_served_and_no_starvation():
    """Many short requests arriving behind a long one do not overtake it for ever: waiting
    sequences are admitted in arrival order, and with requests arriving every step every
    one of them finishes within a bounded number of steps."""
    kv, sched = plain(48, budget=12, max_seqs=4)
    long = prompt(0, 60, 3)
    sched.add(long)
    admitted, arrived, finished = [], [], set()
    next_id = 1
    for step in range(400):
        if step < 60:  # a short request every step
            s = prompt(next_id, 3, 2)
            next_id += 1
            sched.add(s)
            arrived.append(s.seq_id)
        out = sched.schedule()
        for s in out.scheduled:
            if s.seq.seq_id not in admitted:
                admitted.append(s.seq.seq_id)
        finished |= {q.seq_id for q in advance(sched, out)}
        if len(finished) == len(arrived) + 1:
            break
    assert len(finished) == len(arrived) + 1, f"unfinished after {step} steps"
    assert admitted == sorted(admitted)  # admitted in arrival order: nobody overtakes
    assert 0 in finished
