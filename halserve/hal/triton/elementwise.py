"""Small memory-bound kernels: rms_norm (+residual), rotary, silu_and_mul, write_kv.

One program per token row; every reduction is over one row in a fixed order, so all of them
are batch-invariant as written. Values are upcast to fp32 right after loading.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _interp_bf16(t: torch.Tensor) -> bool:
    """The interpreter truncates when storing bf16: run such calls in fp32, round in torch."""
    from halserve.hal.triton import configs

    return t.dtype == torch.bfloat16 and configs.interpreting()


# ---- rms_norm -----------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride,
                     h_ptr, h_stride, H, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * h_stride + cols, h, mask=mask)
        x = h.to(tl.float32)
    var = tl.sum(x * x, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None):
    if _interp_bf16(x):
        res = rms_norm(x.float(), weight, eps, None if residual is None else residual.float())
        y, h = (res, None) if residual is None else res
        y = y.to(x.dtype) if out is None else out.copy_(y)
        return y if residual is None else (y, h.to(x.dtype))
    shape = x.shape
    H = shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    o = out.view(-1, H) if out is not None else torch.empty((T, H), dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, H)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty((T, H), dtype=x.dtype, device=x.device)
    else:
        r2, h = x2, o  # unused
    if T:
        BLOCK = _pow2(H)
        _rms_norm_kernel[(T,)](x2, x2.stride(0), r2, r2.stride(0), weight, o, o.stride(0), h, h.stride(0),
                               H, float(eps), HAS_RES=residual is not None, BLOCK=BLOCK,
                               num_warps=min(max(BLOCK // 256, 1), 16))
    o = o.view(shape)
    if residual is not None:
        return o, h.view(shape)
    return o


# ---- rotary -------------------------------------------------------------------------------------
@triton.jit
def _rotate(base, t_stride, h_stride, row, cos, sin, NH, HALF, NEOX: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_R)[None, :]
    mask = (heads < NH) & (i < HALF)
    if NEOX:
        off1 = i
        off2 = i + HALF
    else:
        off1 = 2 * i
        off2 = 2 * i + 1
    p = base + row * t_stride + heads * h_stride
    x1 = tl.load(p + off1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p + off2, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    tl.store(p + off1, o1.to(base.dtype.element_ty), mask=mask)
    tl.store(p + off2, o2.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, q_st, q_sh, k_ptr, k_st, k_sh, cache_ptr, cache_stride,
                   HQ, HK, HALF, NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    i = tl.arange(0, BLOCK_R)[None, :]
    cmask = i < HALF
    cos = tl.load(cache_ptr + pos * cache_stride + i, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * cache_stride + HALF + i, mask=cmask, other=0.0).to(tl.float32)
    _rotate(q_ptr, q_st, q_sh, row, cos, sin, HQ, HALF, NEOX, BLOCK_HQ, BLOCK_R)
    _rotate(k_ptr, k_st, k_sh, row, cos, sin, HK, HALF, NEOX, BLOCK_HK, BLOCK_R)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
           is_neox: bool = True) -> None:
    if _interp_bf16(q):
        qf, kf = q.float(), k.float()
        rotary(positions, qf, kf, cos_sin_cache, is_neox)
        q.copy_(qf)
        k.copy_(kf)
        return
    T = q.shape[0]
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "rotary needs the head dim contiguous"
    HQ, HK = q.shape[1], k.shape[1]
    half = cos_sin_cache.shape[-1] // 2
    if T == 0:
        return
    _rotary_kernel[(T,)](positions, q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1),
                         cos_sin_cache, cos_sin_cache.stride(0), HQ, HK, half, NEOX=bool(is_neox),
                         BLOCK_HQ=_pow2(HQ), BLOCK_HK=_pow2(HK), BLOCK_R=_pow2(half), num_warps=4)


# ---- silu_and_mul -------------------------------------------------------------------------------
@triton.jit
def _silu_and_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * x_stride + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if _interp_bf16(x):
        y = silu_and_mul(x.float())
        return y.to(x.dtype) if out is None else out.copy_(y)
    shape = x.shape
    I = shape[-1] // 2
    x2 = x.reshape(-1, 2 * I)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    o = out if out is not None else torch.empty((*shape[:-1], I), dtype=x.dtype, device=x.device)
    o2 = o.view(-1, I)
    if T:
        BLOCK = min(_pow2(I), 1024)
        _silu_and_mul_kernel[(T, triton.cdiv(I, BLOCK))](x2, x2.stride(0), o2, o2.stride(0), I,
                                                          BLOCK=BLOCK, num_warps=4)
    return o


# ---- write_kv -----------------------------------------------------------------------------------
@triton.jit
def _e4m3_byte(x, neg):
    """The e4m3fn byte of fp32 ``x`` by hal/kv_fp8.py's rule (clamp to +-448, round to nearest
    even, NaN -> 0x7F), sign bit from ``neg``, in integer arithmetic on x's bits only: no float
    add and no hardware cvt, whose rounding or flushing could differ between the GPU and torch
    (on the H200 the earlier float-add-then-cvt version stored 8-52 of ~10k bytes differently)."""
    a = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    exp = a >> 23
    # normals (|x| >= 2^-6): keep 3 of the 23 mantissa bits, ties to even; a carry rolls into
    # the exponent field by itself; then rebias the exponent from 127 to 7 (120 << 3). Clamping
    # the bits at 448's clamps the value (inf too) and keeps the adds clear of int32 overflow.
    an = tl.minimum(a, 0x43E00000)
    normal = ((an + 0x7FFFF + ((an >> 20) & 1)) >> 20) - 960
    # subnormals (|x| < 2^-6): the value in units of 2^-9 is m * 2^(exp - 141); a shift of 25
    # or more leaves less than half a unit (m < 2^24), so 25 stands for every smaller exponent
    m = (a & 0x7FFFFF) | 0x800000
    s = tl.minimum(tl.maximum(141 - exp, 21), 25)
    q = m >> s
    rem = m - (q << s)
    half = 1 << (s - 1)
    sub = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    mag = tl.where(exp >= 121, normal, sub)
    mag = tl.where(a > 0x7F800000, 0x7F, mag)  # NaN
    return tl.where(neg, mag | 0x80, mag)


@triton.jit
def _is_negative(x):
    """x's sign bit, read from its own bits: a GPU multiply turns -NaN into +NaN, torch on the
    CPU keeps the sign (and x * (1 / scale) has x's sign otherwise: the scale is positive)."""
    if x.dtype == tl.float32:
        return x.to(tl.int32, bitcast=True) < 0
    else:
        return x.to(tl.int16, bitcast=True) < 0


@triton.jit
def _write_kv_kernel(k_ptr, k_st, k_sh, v_ptr, v_st, v_sh, cache_ptr, v_off, slot_ptr,
                     HK, D, k_inv, v_inv, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    # a slot past the cache (v_off elements a half) is skipped like -1: never a write out of bounds
    if (slot >= 0) & (slot * HK * D < v_off):
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HK) & (d < D)
        # cache is [2, blocks, block_size, HK, D] contiguous: token slot s starts at s * HK * D
        dst = cache_ptr + slot * HK * D + h * D + d
        kk = tl.load(k_ptr + row * k_st + h * k_sh + d, mask=mask)
        vv = tl.load(v_ptr + row * v_st + h * v_sh + d, mask=mask)
        if FP8:  # hal/kv_fp8.py's rule; the cache comes as its uint8 view, the byte is built here
            # one IEEE fp32 multiply (what torch does); only integer ops read its result, so
            # nothing can fuse it
            kk = _e4m3_byte(kk.to(tl.float32) * k_inv, _is_negative(kk))
            vv = _e4m3_byte(vv.to(tl.float32) * v_inv, _is_negative(vv))
        tl.store(dst, kk.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + v_off, vv.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    from halserve.hal.kv_fp8 import inv_scale, is_fp8

    T, HK, D = key.shape
    assert kv_cache.is_contiguous() and kv_cache.shape[-2:] == (HK, D), \
        f"kv_cache {tuple(kv_cache.shape)} must be contiguous [2, blocks, block_size, {HK}, {D}]"
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    if T == 0:
        return
    v_off = kv_cache[0].numel()
    fp8 = is_fp8(kv_cache.dtype)
    _write_kv_kernel[(T,)](key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
                           kv_cache.view(torch.uint8) if fp8 else kv_cache, v_off, slot_mapping, HK, D,
                           inv_scale(k_scale), inv_scale(v_scale),
                           BLOCK_H=_pow2(HK), BLOCK_D=_pow2(D), FP8=fp8, num_warps=4)
