"""The KV connector: how the engine talks to a store of KV blocks outside the device cache
(the offload tiers are one), in the shape of vLLM v1's ``KVConnectorBase_V1``.

The scheduler, core and runner know only this interface; the model knows nothing of it.

Scheduler side (pure Python, no device work):

- ``get_num_new_matched_tokens(seq, num_computed)``: how many more prompt tokens, past the
  device prefix hit, the store holds for ``seq``, and whether loading them is asynchronous
  (the sequence then waits in ``loading`` holding its blocks while others run). ``None``:
  part of that prefix is being loaded for another sequence right now; ask again later.
- ``update_state_after_alloc(seq, block_ids, num_external_tokens)``: the scheduler has
  allocated ``block_ids`` for those tokens (``[]`` and 0: it could not admit ``seq``; what the
  match held is let go). A synchronous load goes into the step (``SchedulerOutput.kv_loads``);
  an asynchronous one starts.
- ``get_finished_loads()``: asynchronous loads that ended since the last call, as
  ``FinishedLoad`` (how many of their blocks, from the first, hold the KV).
- ``request_finished(seq)``: ``seq`` left (finished or aborted): any load into its blocks
  stops before they can be reused.
- ``blocks_to_save(seq, new)``: of the blocks just committed to the prefix cache, those
  the store wants.

Worker side (the runner, around the forward):

- ``start_load_kv(kv_caches, loads, layer_events)``: queue the copies of this step's
  synchronous loads before the forward; with per-layer events (a backend with a copy stream)
  each layer's copy marks its event and the runner waits per layer (``LayerWaits``).
- ``wait_for_load_kv()``: after the step has run: the copies are done, their host memory goes.
- ``save_kv(kv_caches, blocks)``: queue write-through of committed blocks;
  ``before_step()`` runs what was queued before the next step can overwrite any block.
- ``wait_for_progress()``: the step had nothing to run: wait briefly for async loads;
  ``idle()``: nothing is left to step: finish queued saves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from halserve.engine.kv_cache import block_tokens


@dataclass(slots=True)
class FinishedLoad:
    seq: Any  # engine.sequence.Sequence
    block_ids: list[int]  # the blocks allocated for the load, in prefix order
    num_loaded: int  # block_ids[:num_loaded] hold the KV; the rest hold nothing
    failed: bool  # the copy to the device failed: recompute, and do not ask the store again


class KVConnector:
    """No external store: every method is the no-op answer."""

    # ---- scheduler side -----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, seq, num_computed_tokens: int) -> "tuple[int, bool] | None":
        return 0, False

    def update_state_after_alloc(self, seq, block_ids: list[int], num_external_tokens: int) -> list:
        """The synchronous loads for the step: (device block id, payload, release token)."""
        return []

    def get_finished_loads(self) -> list[FinishedLoad]:
        return []

    def request_finished(self, seq) -> None:
        pass

    def blocks_to_save(self, seq, new: list[tuple[int, bytes]]) -> list:
        return []

    # ---- worker side --------------------------------------------------------------------------
    def start(self, kv_cache, borrow_blocks, return_blocks) -> None:
        """Once, with the device KV cache allocated (every layer as one tensor)."""

    def start_load_kv(self, kv_caches: list, loads: list, layer_events: "list | None") -> None:
        pass

    def wait_for_load_kv(self) -> None:
        pass

    def save_kv(self, kv_caches: list, blocks: list) -> None:
        pass

    def before_step(self) -> None:
        pass

    def wait_for_progress(self) -> None:
        pass

    def idle(self) -> None:
        """The engine has nothing to step: finish queued saves."""

    def stats(self) -> "dict[str, Any] | None":
        return None


class LayerWaits:
    """The per-layer KV caches as the model iterates them, waiting on each layer's event
    just before handing out that layer's cache.

    Why this and not a wait in the model's layer loop: the model zips its layers with
    ``kv_caches`` and takes cache i right before running layer i, so a wait placed here runs
    at exactly the same point, on the compute stream, while the model stays unaware that
    anything is being copied in (captured graphs record the same waits)."""

    __slots__ = ("caches", "events")

    def __init__(self, caches: list, events: list):
        self.caches, self.events = caches, events

    def __len__(self) -> int:
        return len(self.caches)

    def __getitem__(self, i):
        self.events[i].wait()
        return self.caches[i]

    def __iter__(self):
        for ev, cache in zip(self.events, self.caches, strict=True):
            ev.wait()
            yield cache


class OffloadConnector(KVConnector):
    """The offload tiers (``engine.offload.OffloadManager``) as a KV connector."""

    def __init__(self, manager, block_size: int):
        self.manager = manager
        self.block_size = block_size
        self._found: dict[int, Any] = {}  # seq id -> its lookup, between match and alloc
        self._jobs: dict[int, tuple[Any, Any]] = {}  # seq id -> (sequence, load job)

    # ---- scheduler side -----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, seq, num_computed_tokens: int):
        if seq.load_failed:
            return 0, False
        start = num_computed_tokens // self.block_size
        stop = min((seq.num_tokens - 1) // self.block_size, len(seq.block_hashes))  # keep a token to compute
        found = self.manager.lookup(seq.block_hashes[start:stop], block_tokens(seq, start, self.block_size))
        if found.pending:
            return None
        n = len(found.blocks) + len(found.disk)
        if n:
            self._found[seq.seq_id] = found
        return n * self.block_size, bool(found.disk)

    def update_state_after_alloc(self, seq, block_ids: list[int], num_external_tokens: int) -> list:
        found = self._found.pop(seq.seq_id, None)
        if found is None:
            return []
        if not block_ids:
            self.manager.release(found)
            return []
        if found.disk:
            start = len(seq.block_ids) - len(block_ids)
            job = self.manager.start_load(block_ids, found, block_tokens(seq, start, self.block_size))
            self._jobs[seq.seq_id] = (seq, job)
            return []
        return [(bid, blk, slot) for bid, (_, blk), slot in zip(block_ids, found.blocks, found.slots)]

    def get_finished_loads(self) -> list[FinishedLoad]:
        out = []
        for sid, (seq, job) in list(self._jobs.items()):
            n = self.manager.poll(job)
            if n is None:
                continue
            del self._jobs[sid]
            out.append(FinishedLoad(seq, job.block_ids, n, job.failed))
        return out

    def request_finished(self, seq) -> None:
        entry = self._jobs.pop(seq.seq_id, None)
        if entry is not None:
            self.manager.cancel(entry[1])  # waits for copies in flight into its blocks
        found = self._found.pop(seq.seq_id, None)
        if found is not None:
            self.manager.release(found)

    def blocks_to_save(self, seq, new: list[tuple[int, bytes]]) -> list:
        return self.manager.blocks_to_save(seq, new, self.block_size)

    # ---- worker side --------------------------------------------------------------------------
    def start(self, kv_cache, borrow_blocks, return_blocks) -> None:
        self.manager.bind(kv_cache)  # load jobs copy into it
        warm = borrow_blocks(self.manager.pump_blocks) or []
        try:  # a batch of zero blocks through the load path into free device blocks
            self.manager.prepare(warm)
        finally:
            return_blocks(warm)

    def start_load_kv(self, kv_caches: list, loads: list, layer_events: "list | None") -> None:
        bids, blocks, slots = zip(*loads)
        self.manager.scatter(kv_caches, list(bids), list(blocks), list(slots), wait=False, events=layer_events)

    def wait_for_load_kv(self) -> None:
        self.manager.loads_done()

    def save_kv(self, kv_caches: list, blocks: list) -> None:
        self.manager.save_later(kv_caches, blocks)

    def before_step(self) -> None:
        self.manager.save_pending()

    def wait_for_progress(self) -> None:
        self.manager.wait_pending()

    def idle(self) -> None:
        self.manager.idle()

    def stats(self) -> "dict[str, Any] | None":
        return self.manager.stats()

    def close(self) -> None:
        self.manager.close()


def build_kv_connector(config, hal, model_config, device, model_fingerprint: bytes,
                       max_model_len: int) -> KVConnector:
    """The connector the engine's config asks for: the offload tiers, or none."""
    if not (config.kv_offload_host_bytes or config.kv_offload_dir):
        return KVConnector()
    from halserve.engine.offload import build_offload  # only when a store is configured

    manager = build_offload(config, hal, model_config, device, model_fingerprint, max_model_len)
    return KVConnector() if manager is None else OffloadConnector(manager, config.block_size)
