"""The one-line IndexErrors of the C backends' index checks (cpu_amx, riscv_rvv).

Their kernels compare every index a caller passes (KV slots, positions into the cos/sin
table, block ids, context lengths) with the bound they are given, skip what is out of range
and return a count or a code; these functions turn that into the error, reading the offending
value back only then (the error path: the hot path never pays a host read)."""
from __future__ import annotations

import torch


def _first(bad: torch.Tensor) -> int:
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else -1


def slot_error(op: str, slots: torch.Tensor, nslots: int) -> IndexError:
    """A slot at or past the cache's ``nslots`` (negative slots are padding: skipped)."""
    s = slots.reshape(-1).to(torch.int64)
    i = _first(s >= nslots)
    what = f"slot_mapping[{i}] = {int(s[i])}" if i >= 0 else "a slot (it changed during the call)"
    return IndexError(f"{op}: {what} is outside the KV cache's {nslots} slots (valid 0..{nslots - 1}, or "
                      "negative to skip the token); rows with a valid slot were written, that one was not")


def position_error(op: str, positions: torch.Tensor, rows: int) -> IndexError:
    """A position outside the cos/sin table's ``rows``."""
    p = positions.reshape(-1).to(torch.int64)
    i = _first((p < 0) | (p >= rows))
    what = f"positions[{i}] = {int(p[i])}" if i >= 0 else "a position (it changed during the call)"
    return IndexError(f"{op}: {what} is outside the cos/sin cache's {rows} rows (valid 0..{rows - 1}); "
                      "that token was skipped (not rotated, nor written)")


def read_blocks(qlen: int, slen: int, bs: int, window: int) -> range:
    """The block-table columns a sequence's queries read: from its first query's first visible
    key (a sliding window skips the older ones) to its last key."""
    if qlen <= 0 or slen <= 0:
        return range(0)
    p0 = slen - qlen
    beg = max(0, p0 - window + 1) if window > 0 else 0
    return range(beg // bs, (slen - 1) // bs + 1)


def attention_error(op: str, code: int, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, bs: int, window: int, num_blocks: int, rows: int) -> IndexError:
    """The kernels' attention code 1 + 4 * seq + what (attention.c's check_indices; riscv_rvv's
    paged.c the same): 0 cu_seqlens_q, 1 a context shorter than its query, 2 a context past
    the table's width, 3 a block id outside the cache."""
    seq, what = divmod(code - 1, 4)
    cu = cu_seqlens_q.reshape(-1).tolist()
    if what == 0:
        return IndexError(f"{op}: cu_seqlens_q[{seq}:{seq + 2}] = {cu[seq:seq + 2]}: it must start at 0, never "
                          f"decrease and end within the {rows} query rows")
    qlen, slen = cu[seq + 1] - cu[seq], int(seq_lens.reshape(-1)[seq])
    width = block_tables.shape[-1]
    if what == 1:
        return IndexError(f"{op}: sequence {seq}'s context seq_lens[{seq}] = {slen} is shorter than its {qlen} "
                          "query tokens")
    if what == 2:
        return IndexError(f"{op}: seq_lens[{seq}] = {slen} keys need {-(-slen // bs)} blocks of {bs}, past the "
                          f"block table's {width} columns")
    row = block_tables[seq].tolist()
    # the blocks the C kernels read first; then every block of the context (what a gather reads)
    for j in [*read_blocks(qlen, slen, bs, window), *range(min(-(-slen // bs), width))]:
        if not 0 <= row[j] < num_blocks:
            return IndexError(f"{op}: block_tables[{seq}, {j}] = {row[j]} is outside the KV cache's {num_blocks} "
                              f"blocks (valid 0..{num_blocks - 1})")
    return IndexError(f"{op}: sequence {seq} reads a block outside the KV cache's {num_blocks} blocks")


def block_pair_error(op: str, mapping: torch.Tensor, src_blocks: int, dst_blocks: int) -> IndexError:
    """A block copy/swap pair (src, dst) outside its cache's blocks."""
    m = mapping.reshape(-1, 2).to(torch.int64)
    for i, (s, d) in enumerate(m.tolist()):
        if not 0 <= s < src_blocks:
            return IndexError(f"{op}: block_mapping[{i}, 0] = {s} is outside the source's {src_blocks} blocks "
                              f"(valid 0..{src_blocks - 1})")
        if not 0 <= d < dst_blocks:
            return IndexError(f"{op}: block_mapping[{i}, 1] = {d} is outside the destination's {dst_blocks} "
                              f"blocks (valid 0..{dst_blocks - 1})")
    return IndexError(f"{op}: a block id outside the caches (it changed during the call)")
