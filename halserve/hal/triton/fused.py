"""Fused small ops: rotary + write_kv in one launch (one program per token).

A decode step of a 1B Llama runs ~20 small kernels per layer pair, each a few microseconds of
launch and tail for a few kilobytes of work (docs/performance.md, issue 20); this one takes
the rotary and the KV scatter of a layer into one. Each head row of q and k is rotated in
registers over its whole head dim (partner lane loaded beside it: j + rot/2 for neox, j ^ 1
for gpt-j), stored back in place after a barrier (the partner may live in another warp, whose
load a store would otherwise race; the interpreter, one thread, never shows it), and k's row,
as just rounded to k's dtype, goes straight to the cache with v's: the same bytes ``rotary``
then ``write_kv`` leave (the arithmetic is theirs, ``o1 = x1 cos - x2 sin``,
``o2 = x2 cos + x1 sin``; the fp8 store is write_kv's integer e4m3 rule).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from halserve.hal.triton.elementwise import _e4m3_byte, _is_negative, _pow2

# head rows handled per step of a program's loop: at most ~2k elements of each tensor live in
# registers (4 warps), so 64 heads x 128 dims do not spill
_MAX_TILE = 2048


@triton.jit
def _bf16_rne(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32: the interpreter truncates
    when it stores bf16, so under it the kernel rounds first (finite values; NaN stays NaN)."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return tl.where(x == x, b.to(tl.float32, bitcast=True), x)


@triton.jit
def _rounded(x, dtype, RNE: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` and back (bf16 under the interpreter: _bf16_rne)."""
    if RNE:
        return _bf16_rne(x)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rotated(ptr, row_off, heads, d, NH, D, h_stride, cs_ptr, HALF, ROT, w_ptr, eps,
             NEOX: tl.constexpr, RNE: tl.constexpr, NORM: tl.constexpr):
    """The rotated rows [heads, d] of one token (d past ROT unchanged), rounded to the
    tensor's dtype (as fp32 when RNE), and their addresses and mask. NORM: each row first
    becomes rms_norm(row) * w in the tensor's dtype (elementwise.rms_norm's arithmetic)."""
    mask = (heads < NH) & (d < D)
    rotm = mask & (d < ROT)
    if NEOX:
        first = d < HALF
        j = tl.where(first, d, d - HALF)
        partner = tl.where(first, d + HALF, d - HALF)
    else:
        first = (d % 2) == 0
        j = d // 2
        partner = tl.where(first, d + 1, d - 1)
    p = ptr + row_off + heads * h_stride
    x = tl.load(p + d, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    xp = tl.load(p + partner, mask=rotm, other=0.0).to(tl.float32)
    if NORM:
        rstd = (1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps))[:, None]
        xf = _rounded(xf * rstd * tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32), x.dtype, RNE)
        xp = _rounded(xp * rstd * tl.load(w_ptr + partner, mask=rotm, other=0.0).to(tl.float32), x.dtype, RNE)
    c = tl.load(cs_ptr + j, mask=rotm, other=0.0)
    s = tl.load(cs_ptr + HALF + j, mask=rotm, other=0.0)
    o = tl.where(first, xf * c - xp * s, xf * c + xp * s)
    if RNE:
        o = _bf16_rne(o)
        o = tl.where(d < ROT, o, xf)
    elif NORM:
        o = tl.where(d < ROT, o, xf).to(x.dtype)
    else:
        o = tl.where(d < ROT, o.to(x.dtype), x)
    return o, p + d, mask


@triton.jit
def _store_kv(dst, x, mask, inv, FP8: tl.constexpr):
    if FP8:  # write_kv's rule on the value as stored in k's dtype (see elementwise._e4m3_byte)
        x = _e4m3_byte(x.to(tl.float32) * inv, _is_negative(x))
    tl.store(dst, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_write_kv_kernel(pos_ptr, q_ptr, q_st, q_sh, k_ptr, k_st, k_sh, v_ptr, v_st, v_sh,
                            cs_ptr, cs_stride, cache_ptr, v_off, slot_ptr, HQ, HK, D, HALF, ROT,
                            k_inv, v_inv, qw_ptr, kw_ptr, eps, NEOX: tl.constexpr, FP8: tl.constexpr,
                            RNE: tl.constexpr, NORM: tl.constexpr,
                            BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    cs = cs_ptr + pos * cs_stride
    d = tl.arange(0, BLOCK_D)[None, :]
    for h0 in range(0, HQ, BLOCK_HQ):
        heads = h0 + tl.arange(0, BLOCK_HQ)[:, None]
        o, dst, mask = _rotated(q_ptr, row * q_st, heads, d, HQ, D, q_sh, cs, HALF, ROT, qw_ptr, eps, NEOX, RNE,
                                NORM)
        # in place: another warp may still have to load this lane as its partner
        tl.debug_barrier()
        tl.store(dst, o.to(q_ptr.dtype.element_ty), mask=mask)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    for h0 in range(0, HK, BLOCK_HK):
        heads = h0 + tl.arange(0, BLOCK_HK)[:, None]
        o, dst, mask = _rotated(k_ptr, row * k_st, heads, d, HK, D, k_sh, cs, HALF, ROT, kw_ptr, eps, NEOX, RNE,
                                NORM)
        tl.debug_barrier()
        tl.store(dst, o.to(k_ptr.dtype.element_ty), mask=mask)
        if (slot >= 0) & (slot * HK * D < v_off):  # past the cache: skipped like -1, never out of bounds
            # cache [2, blocks, block_size, HK, D] contiguous: token slot s starts at s * HK * D
            at = cache_ptr + slot * HK * D + heads * D + d
            _store_kv(at, o, mask, k_inv, FP8)
            vv = tl.load(v_ptr + row * v_st + heads * v_sh + d, mask=mask)
            _store_kv(at + v_off, vv, mask, v_inv, FP8)


def _heads_block(h: int, block_d: int) -> int:
    return max(1, min(_pow2(h), _MAX_TILE // block_d))


def rotary_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin_cache: torch.Tensor, is_neox: bool, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
                    q_norm_weight: "torch.Tensor | None" = None, k_norm_weight: "torch.Tensor | None" = None,
                    norm_eps: float = 1e-6) -> None:
    """q [T, Hq, D] and k [T, Hk, D] rotated in place (any row/head strides, unit stride on D),
    k and v [T, Hk, D] written to the contiguous default-layout cache at slot_mapping; with
    the norm weights [D] (contiguous), each head row RMS-normalised first."""
    from halserve.hal.kv_fp8 import inv_scale, is_fp8
    from halserve.hal.triton import configs

    T, HK, D = k.shape
    assert kv_cache.is_contiguous() and kv_cache.shape[-2:] == (HK, D), \
        f"kv_cache {tuple(kv_cache.shape)} must be contiguous [2, blocks, block_size, {HK}, {D}]"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "unit stride on the head dim"
    assert q.dtype == k.dtype, f"q is {q.dtype}, k is {k.dtype}: one dtype"
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("rotary_write_kv: pass q_norm_weight and k_norm_weight together, or neither")
    if T == 0:
        return
    rot = cos_sin_cache.shape[-1]
    fp8 = is_fp8(kv_cache.dtype)
    block_d = _pow2(D)
    norm = None if q_norm_weight is None else (q_norm_weight.contiguous(), k_norm_weight.contiguous())
    rne = q.dtype == torch.bfloat16 and configs.interpreting()
    _rotary_write_kv_kernel[(T,)](
        positions, q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        cos_sin_cache, cos_sin_cache.stride(0), kv_cache.view(torch.uint8) if fp8 else kv_cache,
        kv_cache[0].numel(), slot_mapping, q.shape[1], HK, D, rot // 2, rot,
        inv_scale(k_scale), inv_scale(v_scale), q if norm is None else norm[0], q if norm is None else norm[1],
        float(norm_eps), NEOX=bool(is_neox), FP8=fp8, RNE=rne, NORM=norm is not None,
        BLOCK_HQ=_heads_block(q.shape[1], block_d), BLOCK_HK=_heads_block(HK, block_d), BLOCK_D=block_d,
        num_warps=4)
