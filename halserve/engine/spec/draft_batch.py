"""What a drafter with its own KV (a draft model, a draft head) shares: that KV, one block
pool with the target's, and the flat batch of one drafting forward.

The KV lives in the target's block pool: block id b holds the target's KV in the target's
cache and the drafter's in this one (same block size, same block tables), so the scheduler's
one allocation covers both and nothing about blocks is tracked twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from halserve.hal.interface import AttentionMetadata


class DraftKV:
    """The drafter's half of every block: ``num_layers`` caches of the HAL's layout."""

    def __init__(self, hal, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.hal, self.block_size, self.device, self.dtype = hal, block_size, device, dtype
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.caches: list[torch.Tensor] = []

    def bytes_per_block(self) -> int:
        shape = self.hal.kv_cache_shape(1, self.block_size, self.num_kv_heads, self.head_dim)
        return torch.Size(shape).numel() * self.num_layers * torch.empty((), dtype=self.dtype).element_size()

    def allocate(self, num_blocks: int) -> None:
        shape = self.hal.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.cache = torch.zeros((self.num_layers, *shape), dtype=self.dtype, device=self.device)
        self.caches = list(self.cache.unbind(0))


@dataclass(slots=True)
class DraftRow:
    """One sequence's query in a drafting forward: ``n`` tokens at positions ``start..``.
    The drafter's context starts at ``origin`` (a block boundary: what it attends to is
    ``block_ids[origin // bs:]``, positions ``origin..``); ``write`` False: a row only along
    to keep the batch's shape (its KV is not written, its output is dropped)."""

    block_ids: list[int]
    start: int
    n: int
    origin: int = 0
    write: bool = True


def draft_batch(rows: list[DraftRow], block_size: int, device, max_position: int,
                sliding_window: int | None = None) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
    """(positions, attention metadata, index of each row's last token) for ``rows``, in
    their order (single-token rows must come first: the metadata's decode prefix). Positions
    and slots are built with numpy, not a loop a token (a head consumes whole prefill chunks)."""
    pos, slots, qlens, klens, tables = host_batch(rows, block_size, max_position)
    width = max(len(t) for t in tables)
    cu = np.concatenate(([0], np.cumsum(qlens))).tolist()
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(klens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
        max_seqlen_q=max(qlens), max_seqlen_k=max(klens), query_lens_host=qlens, seq_lens_host=klens,
        block_size=block_size, num_decode_seqs=sum(1 for q in qlens if q == 1), sliding_window=sliding_window)
    last = torch.tensor(cu[1:], dtype=torch.int64, device=device) - 1
    return torch.from_numpy(np.concatenate(pos).astype(np.int64)).to(device), meta, last


def host_batch(rows: list[DraftRow], block_size: int, max_position: int):
    """The host side of ``draft_batch``: per row its positions and slots (numpy), query and
    key lengths, and block table (from its context's first block)."""
    bs = block_size
    pos, slots, qlens, klens, tables = [], [], [], [], []
    for r in rows:
        end = r.start + r.n
        table = r.block_ids[r.origin // bs:]
        p = np.arange(r.start, end)
        if r.write:
            pos.append(p)
            slots.append(np.asarray(r.block_ids, dtype=np.int64)[p // bs] * bs + p % bs)
        else:  # a row along for the shape reads a clamped, valid position and writes nothing
            pos.append(np.minimum(p, max_position - 1))
            slots.append(np.full(r.n, -1, dtype=np.int64))
        qlens.append(r.n)
        # ... and reads no further than its own blocks
        klens.append(end - r.origin if r.write else max(r.n, min(end - r.origin, len(table) * bs)))
        tables.append(table)
    return pos, slots, qlens, klens, tables
