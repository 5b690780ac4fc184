"""Block pool, block tables and the prefix cache (hash chain), with no device code.

Block hash = sha256(parent hash || model fingerprint || token ids): deterministic across
processes, so KV tiers can share blocks and a restart can find them again. A hash hit is
confirmed token for token before it is reused.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

from halserve.engine.sequence import Sequence

ROOT_HASH = b"halserve-kv-v1"


def chain_hashes(parent: bytes, tokens: "list[int] | tuple[int, ...]", block_size: int,
                 fingerprint: bytes) -> list[bytes]:
    """The hash chain of the full blocks of ``tokens`` after ``parent``: each block's hash is
    sha256(parent hash || fingerprint || block size || token ids as int32). The tokens are
    packed in one go (a long prompt has hundreds of blocks, hashed before its first step)."""
    n = len(tokens) // block_size
    packed = memoryview(struct.pack(f"<{n * block_size}i", *tokens[:n * block_size]))
    head = fingerprint + block_size.to_bytes(4, "little")
    step = 4 * block_size
    out = []
    sha256 = hashlib.sha256
    for k in range(n):  # one call a block: the same digest as updating in three parts
        parent = sha256(b"".join((parent, head, packed[k * step:(k + 1) * step]))).digest()
        out.append(parent)
    return out


def block_tokens(seq: Sequence, start: int, block_size: int):
    """Block ``start + i``'s tokens of ``seq``, as a function of i (prefix-cache and tier checks)."""
    return lambda i: tuple(seq.token_ids[(start + i) * block_size:(start + i + 1) * block_size])


def block_hash(parent: bytes, tokens: "list[int] | tuple[int, ...]", fingerprint: bytes) -> bytes:
    return chain_hashes(parent, tokens, len(tokens), fingerprint)[0]


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    tokens: tuple[int, ...] | None = None  # for the token-for-token check


@dataclass(slots=True)
class PrefixStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens served from the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 fingerprint: bytes = b""):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.fingerprint = fingerprint
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count == 0 blocks in eviction order (oldest first); cached ones keep their hash
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.stats = PrefixStats()
        self.evicted_hashes: list[bytes] = []  # for tiers below (offload), drained by the engine

    # ---- queries ------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- hashing ------------------------------------------------------------------------
    def update_hashes(self, seq: Sequence, upto_tokens: int | None = None) -> None:
        """Extend seq.block_hashes over every full block among its first ``upto_tokens``."""
        n = seq.num_tokens if upto_tokens is None else upto_tokens
        bs = self.block_size
        first, last = len(seq.block_hashes), n // bs
        if last > first:
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            seq.block_hashes += chain_hashes(parent, seq.token_ids[first * bs:last * bs], bs, self.fingerprint)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of seq's tokens. At least one token is always left
        to compute (its logits are needed), so a full-prompt hit backs off one block."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        bs = self.block_size
        hit: list[int] = []
        for i in range(min(max_blocks, len(seq.block_hashes))):
            bid = self.cached.get(seq.block_hashes[i])
            if bid is None or self.blocks[bid].tokens != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hit.append(bid)
        return hit

    def record_lookup(self, seq: Sequence, num_hit_blocks: int) -> None:
        self.stats.queries += seq.num_tokens
        self.stats.hits += num_hit_blocks * self.block_size

    # ---- allocation -----------------------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_queue)

    def _take_free(self) -> int:
        bid, _ = self.free_queue.popitem(last=False)
        blk = self.blocks[bid]
        if blk.hash is not None:  # evict from the prefix cache
            if self.cached.get(blk.hash) == bid:
                del self.cached[blk.hash]
                self.evicted_hashes.append(blk.hash)
            blk.hash = None
            blk.tokens = None
        blk.ref_count = 1
        return bid

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_count == 0:
                self.free_queue.pop(bid, None)
            blk.ref_count += 1

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover ``num_tokens`` tokens; False (and no change) if the
        pool is short."""
        need = self.blocks_needed(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > len(self.free_queue):
            return False
        seq.block_ids.extend(self._take_free() for _ in range(need))
        return True

    def allocate_fresh(self, n: int) -> list[int] | None:
        """n blocks outside any sequence (e.g. to load offloaded KV into); None if short."""
        if n > len(self.free_queue):
            return None
        return [self._take_free() for _ in range(n)]

    def free(self, seq: Sequence) -> None:
        # Tail blocks go to the front of the eviction order: they are the least reusable.
        for bid in reversed(seq.block_ids):
            self.release(bid)
        seq.block_ids = []
        seq.num_committed_blocks = 0

    def release(self, bid: int) -> None:
        blk = self.blocks[bid]
        blk.ref_count -= 1
        assert blk.ref_count >= 0, f"block {bid} freed twice"
        if blk.ref_count == 0:
            self.free_queue[bid] = None

    # ---- prefix registration --------------------------------------------------------------
    def commit(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """Register seq's full, computed blocks in the prefix cache; returns the newly
        registered (block_id, hash) pairs (for write-through to lower KV tiers)."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq, seq.num_computed_tokens)
        new: list[tuple[int, bytes]] = []
        bs = self.block_size
        end = min(seq.num_computed_tokens // bs, len(seq.block_hashes), len(seq.block_ids))
        start, seq.num_committed_blocks = seq.num_committed_blocks, end  # each block is looked at once
        for i in range(start, end):
            h = seq.block_hashes[i]
            bid = seq.block_ids[i]
            blk = self.blocks[bid]
            if blk.hash is not None:
                continue
            owner = self.cached.get(h)
            if owner is None:
                blk.hash = h
                blk.tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.cached[h] = bid
                new.append((bid, h))
        return new

    def register_loaded(self, bid: int, h: bytes, tokens: tuple[int, ...]) -> None:
        """A block whose KV was loaded from a lower tier becomes a cached block."""
        blk = self.blocks[bid]
        blk.hash = h
        blk.tokens = tokens
        self.cached[h] = bid

    def reset_prefix_cache(self) -> None:
        for bid in list(self.free_queue):
            blk = self.blocks[bid]
            if blk.hash is not None and self.cached.get(blk.hash) == bid:
                del self.cached[blk.hash]
            blk.hash = None
            blk.tokens = None
