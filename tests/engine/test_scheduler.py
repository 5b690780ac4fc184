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
