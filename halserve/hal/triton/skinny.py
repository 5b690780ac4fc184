"""Weight-streaming GEMM for few rows (decode): ``y = x @ W^T`` with M small and W large.

At decode a linear layer reads its whole weight to produce a handful of rows, so its speed is
the rate at which the chip streams W. A classic tiled GEMM gives one program per output tile:
at M <= 16 that is ``N / BLOCK_N`` programs, too few to keep every SM's loads in flight. Here
the K axis is split too: program ``(m_tile, n_tile, split)`` reduces its own K range into an
fp32 partial, and a second tiny kernel adds the partials **in split order** and applies the
scales and bias. The split count depends on the weight's shape only (never on M) and rows
never mix, so a row's result does not depend on its batch. The cuda backend uses it for W8A8
linears at M <= 16 outside batch-invariant mode (at M = 64 it streamed at 20-40% on the H200,
so batch-invariant mode keeps ``matmul.persistent_matmul``, which gained the same fixed split);
the bf16 and weight-only forms are kept for the micro-benchmark (``bench/skinny_gemm.py``).

Weights: bf16/fp16/fp32 ``[N, K]``, or fp8 e4m3 ``[N, K]`` with scale [1] or [N]. For W8A8 the
few activation rows are quantized first in one small pass (``matmul.quant_fp8_per_token``;
inside the kernel every program would re-read its whole row for the amax) and the kernel
streams e4m3 x e4m3 on the tensor cores (sm_89+; elsewhere exactly in fp16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from halserve.hal.triton import configs

BLOCK_M = 16


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, part_ptr, M, N, K, s_xm, s_wn, k_per_split,
                   W_FP8: tl.constexpr, A_FP8: tl.constexpr,
                   FP8_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    x_rows = x_ptr + rm[:, None].to(tl.int64) * s_xm
    w_cols = w_ptr + rn[None, :].to(tl.int64) * s_wn
    k_lo = ps * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < k_hi
        a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif FP8_DOT:  # e4m3 x e4m3 on the tensor cores (sm_89+)
            acc = tl.dot(a, b, acc)
        elif A_FP8:  # e4m3 x e4m3, exact in fp16 (one cvt per pair of weights)
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        elif W_FP8:  # weight-only: every e4m3 value is exact in bf16 and fp16
            acc = tl.dot(a, b.to(a.dtype), acc)
        else:
            acc = tl.dot(a, b, acc)
    part = part_ptr + ps.to(tl.int64) * M * N
    tl.store(part + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=m_ok[:, None] & (rn < N)[None, :])


@triton.jit
def _reduce_kernel(part_ptr, y_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, s_ym, SPLITS,
                   A_SCALE: tl.constexpr, A_PER_ROW: tl.constexpr, W_SCALE: tl.constexpr, W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rn < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for s in range(0, SPLITS):  # fixed order: the same sum for a row in any batch
        acc += tl.load(part_ptr + (s * M + m).to(tl.int64) * N + rn, mask=ok, other=0.0)
    if A_SCALE:
        if A_PER_ROW:
            acc = acc * tl.load(xs_ptr + m)
        else:
            acc = acc * tl.load(xs_ptr)
    if W_SCALE:
        if W_PER_COL:
            acc = acc * tl.load(ws_ptr + rn, mask=ok, other=0.0)
        else:
            acc = acc * tl.load(ws_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * s_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _fp8_dot(device: torch.device) -> bool:
    """Tensor-core fp8 x fp8 dots: sm_89+ (not the interpreter)."""
    if configs.interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def skinny_config(n: int, k: int, w_bytes: int) -> dict:
    """Tiles and split count from the weight's shape only (never M): enough programs to keep
    every SM streaming (about four per SM), each reading at least ``4 * BLOCK_K`` of K."""
    if configs.interpreting():
        bk = 32
        return dict(BLOCK_N=16, BLOCK_K=bk, SPLITS=2 if k > 2 * bk else 1, num_warps=1, num_stages=1)
    bk = 256 if w_bytes == 1 else 128
    bn = 64
    tiles = triton.cdiv(n, bn)
    want = 4 * configs.num_sms()
    splits = 1
    while tiles * splits < want and k // (splits * 2) >= 4 * bk:
        splits *= 2
    return dict(BLOCK_N=bn, BLOCK_K=bk, SPLITS=splits, num_warps=4, num_stages=4)


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None = None,
                  act_quant: str = "none", bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [M, K] @ w[N, K]^T`` (* scales) (+ bias) -> [M, N] in ``out_dtype`` (x's by default).

    ``w`` fp8 e4m3 needs ``w_scale`` ([1] or [N]); ``act_quant`` 'per_token' / 'per_tensor'
    quantizes x to e4m3 inside the kernel (W8A8), 'none' multiplies x by the upcast weight
    (weight-only). Any M works (programs of 16 rows); it pays off while M is small."""
    M, K = x.shape
    N = w.shape[0]
    assert x.stride(1) == 1 and w.stride(1) == 1, "skinny_matmul needs unit stride along K"
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return y
    w_fp8 = w.dtype.itemsize == 1
    quant = act_quant != "none"
    if quant and not w_fp8:
        raise ValueError("act_quant needs an fp8 weight")
    xs = None
    if quant:  # one pass over the few rows; the kernel then streams e4m3 x e4m3
        from halserve.hal.triton.matmul import quant_fp8_per_tensor, quant_fp8_per_token

        x, xs = quant_fp8_per_token(x) if act_quant == "per_token" else quant_fp8_per_tensor(x)
    cfg = skinny_config(N, K, w.dtype.itemsize)
    splits, bk = cfg["SPLITS"], cfg["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, splits), bk) * bk
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    a_fp8 = x.dtype.itemsize == 1
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, cfg["BLOCK_N"]), splits)
    _skinny_kernel[grid](x, w, part, M, N, K, x.stride(0), w.stride(0), k_per_split, W_FP8=w_fp8, A_FP8=a_fp8,
                         FP8_DOT=a_fp8 and _fp8_dot(x.device),
                         IEEE=x.dtype == torch.float32 or configs.interpreting(), BLOCK_M=BLOCK_M,
                         BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    reduce_splits(part, y, bias, xs if quant else None, w_scale)
    return y


def reduce_splits(part: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None = None,
                  x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> None:
    """y[m, n] = (sum over s in order of part[s, m, n]) * x_scale * w_scale + bias."""
    splits, M, N = part.shape
    rbn = 16 if configs.interpreting() else 256
    _reduce_kernel[(M, triton.cdiv(N, rbn))](
        part, y, x_scale if x_scale is not None else part, w_scale if w_scale is not None else part,
        bias if bias is not None else part, M, N, y.stride(0), splits,
        A_SCALE=x_scale is not None, A_PER_ROW=x_scale is not None and x_scale.numel() > 1,
        W_SCALE=w_scale is not None, W_PER_COL=w_scale is not None and w_scale.numel() > 1,
        HAS_BIAS=bias is not None, BLOCK_N=rbn, num_warps=4)
