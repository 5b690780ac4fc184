"""Gumbel-max sampling in one pass over the logits, with no host sync.

The noise is the native backend's counter-based hash (``native.counter_uniform``) computed
in uint32 lanes, so for the same (seed, step, logits) this picks the same token as the
native backend. Stage 1: each program scans BLOCK_V columns of one row and writes its
(max, argmax); stage 2 (torch) picks the first maximal block, which keeps torch.argmax's
first-index tie rule.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from halserve.hal.triton import configs


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(x_ptr, s_x, raw_ptr, s_raw, temp_ptr, seed_ptr, step_ptr, pmax_ptr, pidx_ptr, V,
                          NUM_BLOCKS, MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    seed = tl.load(seed_ptr + row).to(tl.int64)
    step = tl.load(step_ptr + row).to(tl.int64)
    temp = tl.load(temp_ptr + row).to(tl.float32)
    m32 = 0xFFFFFFFF
    h = _mix32((seed & m32).to(tl.uint32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seed >> 32) & m32).to(tl.uint32))
    h = _mix32(h ^ (step & m32).to(tl.uint32) ^ 0x85EBCA6B)
    h = _mix32(h ^ ((step >> 32) & m32).to(tl.uint32))
    cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < V
    if temp > 0.0:
        c = _mix32(cols.to(tl.uint32) ^ 0x27D4EB2F)
        r = _mix32(h ^ c)
        r = _mix32(r ^ h)
        u = ((r >> 9) * 2 + 1).to(tl.float32) * (1.0 / 16777216.0)
        g = -tl.log(-tl.log(u))
        x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=float("-inf")).to(tl.float32)
        if not MASKED:
            x = x / temp
        val = x + g
    else:
        val = tl.load(raw_ptr + row * s_raw + cols, mask=ok, other=float("-inf")).to(tl.float32)
    val = tl.where(ok, val, float("-inf"))
    m = tl.max(val, axis=0)
    i = tl.argmax(val, axis=0, tie_break_left=True)
    tl.store(pmax_ptr + row * NUM_BLOCKS + blk, m)
    tl.store(pidx_ptr + row * NUM_BLOCKS + blk, (blk * BLOCK_V + i).to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, masked: torch.Tensor | None, temperature: torch.Tensor,
                  seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Rows with temperature 0 take argmax(logits); others argmax(scaled + gumbel(seed, step)),
    where scaled is ``masked`` if given (already divided by the temperature) else logits / t."""
    B, V = logits.shape
    block_v = 256 if configs.interpreting() else 2048
    nb = triton.cdiv(V, block_v)
    pmax = torch.empty((B, nb), dtype=torch.float32, device=logits.device)
    pidx = torch.empty((B, nb), dtype=torch.int64, device=logits.device)
    if B == 0:
        return torch.empty((0,), dtype=torch.int64, device=logits.device)
    x = masked if masked is not None else logits
    _gumbel_argmax_kernel[(B, nb)](x, x.stride(0), logits, logits.stride(0), temperature, seeds, steps,
                                   pmax, pidx, V, nb, MASKED=masked is not None, BLOCK_V=block_v, num_warps=8)
    best = pmax.argmax(dim=1, keepdim=True)
    return pidx.gather(1, best).squeeze(1)
