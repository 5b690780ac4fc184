"""The canonical block layout every tier holds, ``[layers, 2, block_size, kv_heads,
head_dim]``, and the conversion to and from a backend's own, learnt through the backend's
``write_kv`` so that it needs no knowledge of any backend.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from halserve.engine.offload.common import host_empty


if TYPE_CHECKING:
    from halserve.hal.interface import Backend

logger = logging.getLogger("halserve")


# ---- layout ----------------------------------------------------------------------------------

class KVLayout:
    """Maps one block of a backend's KV cache (``cache[:, block]``) to the canonical
    ``[bs, kv_heads, head_dim]`` order and back.

    The map is learned once at start-up: known values are written through the backend's
    ``write_kv`` into a one-block cache of its ``kv_cache_shape`` and read back. Values are
    base-16 digits (plus one), exact in every KV dtype down to fp8, so a few writes recover
    each element's canonical index. The native layout comes out as the identity.
    """

    def __init__(self, hal: "Backend", block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.hal = hal
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.dtype = dtype
        self.device = device
        self.canonical = (block_size, num_kv_heads, head_dim)
        self.numel = block_size * num_kv_heads * head_dim
        self.perm = self._probe()  # canonical index -> flat position within a backend block
        self.identity = bool(torch.equal(self.perm, torch.arange(self.numel)))

    def backend_shape(self, n: int) -> tuple[int, ...]:
        return tuple(self.hal.kv_cache_shape(n, self.block_size, self.num_kv_heads, self.head_dim))

    @torch.inference_mode()
    def _probe(self) -> torch.Tensor:
        shape = self.backend_shape(1)
        if shape[0] != 2 or shape[1] != 1:
            raise ValueError(f"kv_cache_shape {shape}: dim 0 must be 2 (k, v) and dim 1 the block")
        per_block = math.prod(shape[2:])
        idx = torch.arange(self.numel).reshape(self.canonical)
        digits = max(1, math.ceil(math.log(self.numel, 16))) if self.numel > 1 else 1
        slots = torch.arange(self.block_size, dtype=torch.int64, device=self.device)
        found = torch.zeros(per_block, dtype=torch.int64)
        for k in range(digits):
            cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            vals = ((idx // 16 ** k) % 16 + 1).to(self.dtype).to(self.device)
            self.hal.write_kv(vals, vals, cache, slots)
            got = cache[0, 0].reshape(-1).to("cpu", torch.float32).round().to(torch.int64)
            v = cache[1, 0].reshape(-1).to("cpu", torch.float32).round().to(torch.int64)
            if not torch.equal(got, v):
                raise ValueError(f"{self.hal.name}: write_kv stores k and v in different layouts")
            if k == 0:
                written = got > 0
            found += (got - 1).clamp(min=0) * 16 ** k
        pos = torch.nonzero(written).reshape(-1)
        canon = found[pos]
        if pos.numel() != self.numel or not torch.equal(torch.sort(canon).values, torch.arange(self.numel)):
            raise ValueError(f"{self.hal.name}: could not map kv_cache_shape {shape} to "
                             f"[block_size, kv_heads, head_dim] = {list(self.canonical)}")
        perm = torch.empty(self.numel, dtype=torch.int64)
        perm[canon] = pos
        return perm

    def to_canonical(self, staging: torch.Tensor, n: int) -> torch.Tensor:
        """Backend-layout host blocks ``[2, n, ...]`` -> ``[2, n, bs, hk, d]``."""
        flat = staging.reshape(2, n, -1)
        if not self.identity:
            flat = flat.index_select(2, self.perm)
        return flat.reshape(2, n, *self.canonical)

    def from_canonical(self, blocks: torch.Tensor, n: int) -> torch.Tensor:
        """``[2, n, bs, hk, d]`` -> backend-layout host blocks ``[2, n, ...]``."""
        staging = host_empty(self.hal, self.backend_shape(n), self.dtype)
        if self.identity:
            staging.copy_(blocks.reshape(staging.shape))
            return staging
        flat = staging.view(2, n, -1)
        flat.zero_()
        flat.index_copy_(2, self.perm, blocks.reshape(2, n, -1))
        return staging
