"""Weight-streaming GEMM for few rows (decode): ``y = x @ W^T`` with M small and W large.

At decode a linear layer reads its whole weight to produce a handful of rows, so its speed is
the rate at which the chip streams W. A classic tiled GEMM gives one program per output tile:
at M <= 16 that is ``N / BLOCK_N`` programs, too few to keep every SM's loads in flight. Here
the K axis is split too: program ``(m_tile, n_tile, split)`` reduces its own K range into an
fp32 partial, and the partials are added **in split order** (by the last program of a tile to
finish when ``FUSED``, else by a second tiny kernel) before the scales and bias. The split
count depends on the weight's shape only (never on M) and rows never mix, so a row's result
does not depend on its batch. The cuda backend uses it for W8A8 linears at M <= 16 outside
batch-invariant mode (at M = 64 it streamed at 20-40% on the H200, so batch-invariant mode
keeps ``matmul.persistent_matmul``); the bf16 and weight-only forms serve the micro-benchmark
(``bench/skinny_gemm.py``) and the config sweep.

Three inner loops (``KIND`` of ``configs.skinny_config``):
- ``dot``: 16-row tiles through ``tl.dot`` (e4m3 x e4m3 on the tensor cores on sm_89+);
- ``gemv``: CUDA-core FMAs into a [rows, BLOCK_N, BLOCK_K] fp32 accumulator summed over K once
  at the end, for 1-16 rows (no 16-row padding of the MMA, wide vector loads of W);
- ``gemvr``: the same FMAs summed over BLOCK_K every step into [rows, BLOCK_N], with the next
  weight tile loaded before the current one is used. On the H200 (2026-12-04 sweep) ``gemv``
  at one row streamed at the rate its programs' loads allow: ~3 programs an SM with one tile
  each in flight, ~24 KB, ~2.1 TB/s; this form keeps two tiles in flight a program, with no
  accumulator tile (16 x 512 at sm_90: ~100 registers against 119, ``bench/skinny_regs.py``).
  Not yet timed on a GPU; no tuned config selects it.

Weights: bf16/fp16/fp32 ``[N, K]``, or fp8 e4m3 ``[N, K]`` with scale [1] or [N]. For W8A8 the
activation rows are quantized either in one small pass first (``matmul.quant_fp8_per_token``)
or, with ``QUANT_IN``, inside every program (it re-reads its rows for the amax, from L2).
With ``PDL`` (sm_90+) the kernel is launched as a programmatic dependent: it may start while
the kernel before it finishes, and waits (griddepcontrol.wait) before it reads x or writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from halserve.hal.triton import configs

try:  # griddepcontrol.wait (sm_90+): triton >= 3.4; older ones refuse configs with PDL at launch
    from triton.language.extra import cuda as _tl_cuda

    _HAS_GDC = hasattr(_tl_cuda, "gdc_wait")
except ImportError:  # pragma: no cover
    _HAS_GDC = False

BLOCK_M = 16
_COUNTERS: dict = {}  # device -> int32 arrival counters of FUSED tiles (reset by their last program)
_MAX_TILES = 1 << 16


@triton.jit
def _quant_a(a, qs, w_ptr, EXACT_CVT: tl.constexpr):
    """Activation chunk [rows, k] -> e4m3 at the rows' scales ``qs`` (quant_fp8_per_token's rule)."""
    a = tl.clamp(a.to(tl.float32) / qs[:, None], -448.0, 448.0)
    if EXACT_CVT:  # round to e4m3 in fp32 adds first: the interpreter's cast rounds
        # a value that carries into the next binade down (the GPU's cvt agrees either way)
        e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)  # 121: 2^-6
        c = (((e + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2^23 * spacing
        r = tl.abs((a + c) - c)
        a = tl.where(a < 0, -r, r)
    return a.to(w_ptr.dtype.element_ty)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, part_ptr, cnt_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K, s_xm, s_wn, s_ym,
                   k_per_split, SPLITS, ONE_SPLIT: tl.constexpr, GEMV: tl.constexpr, ROW_ACC: tl.constexpr,
                   FUSED: tl.constexpr, QUANT_IN: tl.constexpr, A_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, W_FP8: tl.constexpr, A_FP8: tl.constexpr, FP8_DOT: tl.constexpr,
                   IEEE: tl.constexpr, EXACT_CVT: tl.constexpr, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # QUANT_IN: 0 off, 1 per-token, 2 per-tensor (all M rows in this tile).
    # A_SCALE / W_SCALE: 0 none, 1 per row / per column, 2 one scalar.
    # ROW_ACC (gemv): the product is summed over BLOCK_K every step into [rows, BLOCK_N] (no
    # accumulator tile, so more programs stay resident) and the next weight and activation tiles are
    # loaded before the current ones are used; the first before the amax pass, which they overlap.
    # PDL (launched as a programmatic dependent): the program may start while the kernel before
    # it in the stream finishes; it reads nothing that kernel wrote (x) and writes nothing before
    # griddepcontrol.wait, and the weights, which no kernel writes, may be read before it.
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * s_xm
    k_lo = ps * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if GEMV:
        w_rows = w_ptr + rn[:, None].to(tl.int64) * s_wn
        if ROW_ACC:
            k_ok = (k_lo + rk) < k_hi
            b_next = tl.load(w_rows + (k_lo + rk)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if GEMV:
        if ROW_ACC:
            a_next = tl.load(x_rows + (k_lo + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    if QUANT_IN > 0:  # the same formula as quant_fp8_per_token, over the whole row
        # one real row at a time in wide 1D steps (a 16-row tile of the dot form would otherwise
        # read padding rows in narrow steps): this pass is latency-bound (a few KB from L2)
        amax = tl.zeros([BLOCK_M], tl.float32)
        rq = tl.arange(0, Q_BLOCK)
        for r in range(0, tl.minimum(M - pm * BLOCK_M, BLOCK_M)):
            row = x_ptr + (pm * BLOCK_M + r).to(tl.int64) * s_xm
            mx = tl.zeros([Q_BLOCK], tl.float32)
            for k0 in range(0, K, Q_BLOCK):
                kk = k0 + rq
                mx = tl.maximum(mx, tl.abs(tl.load(row + kk, mask=kk < K, other=0.0).to(tl.float32)))
            amax = tl.where(tl.arange(0, BLOCK_M) == r, tl.max(mx, axis=0), amax)
        if QUANT_IN == 2:
            amax = tl.zeros([BLOCK_M], tl.float32) + tl.max(amax, axis=0)
        qs = tl.maximum(amax, 1e-12) / 448.0
        if (pn == 0) & (ps == 0):  # for a separate reduction kernel
            tl.store(xs_ptr + rm, qs, mask=m_ok)
    if GEMV:
        if ROW_ACC:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        elif BLOCK_M == 1:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        else:
            acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_hi
            if ROW_ACC:
                b = b_next
                a = a_next
                kn = kk + BLOCK_K
                b_next = tl.load(w_rows + kn[None, :], mask=n_ok[:, None] & (kn < k_hi)[None, :], other=0.0)
                a_next = tl.load(x_rows + kn[None, :], mask=m_ok[:, None] & (kn < k_hi)[None, :], other=0.0)
            else:
                b = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if QUANT_IN > 0:
                a = _quant_a(a, qs, w_ptr, EXACT_CVT)
            if ROW_ACC:
                if BLOCK_M == 1:
                    acc += tl.sum(b.to(tl.float32) * a.to(tl.float32), axis=1)[None, :]
                else:
                    acc += tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
            elif BLOCK_M == 1:  # the classic GEMV: a 2D accumulator in the weight tile's layout
                acc2 += b.to(tl.float32) * a.to(tl.float32)
            else:
                acc3 += a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :]
        if not ROW_ACC:
            if BLOCK_M == 1:
                acc = tl.sum(acc2, axis=1)[None, :]
            else:
                acc = tl.sum(acc3, axis=2)
    else:
        w_cols = w_ptr + rn[None, :].to(tl.int64) * s_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_hi
            a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if QUANT_IN > 0:
                a = _quant_a(a, qs, w_ptr, EXACT_CVT)
            b = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
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
    ok = m_ok[:, None] & n_ok[None, :]
    if ONE_SPLIT:
        if A_SCALE == 1:
            if QUANT_IN > 0:
                acc = acc * qs[:, None]
            else:
                acc = acc * tl.load(xs_ptr + rm, mask=m_ok, other=0.0)[:, None]
        elif A_SCALE == 2:
            acc = acc * tl.load(xs_ptr)
        if W_SCALE == 1:
            acc = acc * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)[None, :]
        elif W_SCALE == 2:
            acc = acc * tl.load(ws_ptr)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None].to(tl.int64) * s_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        part = part_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part + ps.to(tl.int64) * M * N, acc, mask=ok)
        if FUSED:
            # the last program of the tile to arrive adds the partials in split order (the
            # same sum as _reduce_kernel), then re-arms the counter for the next call
            tl.debug_barrier()
            tile = pm * tl.num_programs(1) + pn
            old = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if old == SPLITS - 1:
                tot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for s in range(0, SPLITS):
                    tot += tl.load(part + s * M * N, mask=ok, other=0.0, cache_modifier=".cg")
                if A_SCALE == 1:
                    if QUANT_IN > 0:
                        tot = tot * qs[:, None]
                    else:
                        tot = tot * tl.load(xs_ptr + rm, mask=m_ok, other=0.0)[:, None]
                elif A_SCALE == 2:
                    tot = tot * tl.load(xs_ptr)
                if W_SCALE == 1:
                    tot = tot * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)[None, :]
                elif W_SCALE == 2:
                    tot = tot * tl.load(ws_ptr)
                if HAS_BIAS:
                    tot = tot + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + rm[:, None].to(tl.int64) * s_ym + rn[None, :], tot.to(y_ptr.dtype.element_ty),
                         mask=ok)
                tl.atomic_xchg(cnt_ptr + tile, 0)


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


def _counters(device: torch.device) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None:  # made once, outside any graph capture (capture_graph warms up first)
        c = _COUNTERS[device] = torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)
    return c


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None = None,
                  act_quant: str = "none", bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, cfg: dict | None = None) -> torch.Tensor:
    """``x [M, K] @ w[N, K]^T`` (* scales) (+ bias) -> [M, N] in ``out_dtype`` (x's by default).

    ``w`` fp8 e4m3 needs ``w_scale`` ([1] or [N]); ``act_quant`` 'per_token' / 'per_tensor'
    quantizes x to e4m3 (W8A8), 'none' multiplies x by the upcast weight (weight-only).
    ``cfg``: a launch config (``configs.skinny_config``'s keys) instead of the tuned one (the
    sweep). Any M works (programs of up to 16 rows); it pays off while M is small."""
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
    if cfg is None:
        cfg = configs.skinny_config(M, N, K, w.dtype.itemsize)
    kind = cfg.get("KIND", "dot")
    if kind not in ("dot", "gemv", "gemvr"):
        raise ValueError(f"skinny KIND {kind!r}: valid are 'dot', 'gemv', 'gemvr'")
    gemv = kind != "dot"
    bm = min(triton.next_power_of_2(M), 16) if gemv else BLOCK_M
    quant_in = 0
    if quant and cfg.get("QUANT_IN") and (act_quant == "per_token" or M <= bm):
        quant_in = 1 if act_quant == "per_token" else 2
    xs = None
    if quant_in:
        xs = torch.empty((M,), dtype=torch.float32, device=x.device)
    elif quant:  # one pass over the few rows; the kernel then streams e4m3 x e4m3
        from halserve.hal.triton.matmul import quant_fp8_per_tensor, quant_fp8_per_token

        x, xs = quant_fp8_per_token(x) if act_quant == "per_token" else quant_fp8_per_tensor(x)
    splits, bk, bn = cfg["SPLITS"], cfg["BLOCK_K"], cfg["BLOCK_N"]
    k_per_split = triton.cdiv(triton.cdiv(K, splits), bk) * bk
    splits = triton.cdiv(K, k_per_split)  # no empty split
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), splits)
    fused = bool(cfg.get("FUSED")) and splits > 1 and grid[0] * grid[1] <= _MAX_TILES
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else y
    cnt = _counters(x.device) if fused else y
    pdl = bool(cfg.get("PDL")) and not configs.interpreting()  # the interpreter runs kernels one by one
    if pdl and (not _HAS_GDC or x.device.type != "cuda" or torch.version.hip is not None
                or torch.cuda.get_device_capability(x.device) < (9, 0)):  # ROCm reports cuda devices too
        raise ValueError("skinny config PDL=True needs an NVIDIA sm_90+ GPU and triton >= 3.4 (griddepcontrol)")
    launch = {"launch_pdl": True} if pdl else {}
    a_fp8 = x.dtype.itemsize == 1 or quant_in > 0
    a_scale = 0 if xs is None else (1 if quant_in or xs.numel() > 1 else 2)
    w_scale_mode = 0 if w_scale is None else (1 if w_scale.numel() > 1 else 2)
    _skinny_kernel[grid](
        x, w, y, part, cnt, xs if xs is not None else y, w_scale if w_scale is not None else y,
        bias if bias is not None else y, M, N, K, x.stride(0), w.stride(0), y.stride(0), k_per_split,
        SPLITS=splits, ONE_SPLIT=splits == 1, GEMV=gemv, ROW_ACC=kind == "gemvr", FUSED=fused, QUANT_IN=quant_in,
        A_SCALE=a_scale, W_SCALE=w_scale_mode,
        HAS_BIAS=bias is not None, W_FP8=w_fp8, A_FP8=a_fp8, FP8_DOT=a_fp8 and _fp8_dot(x.device),
        IEEE=x.dtype == torch.float32 or configs.interpreting(), EXACT_CVT=configs.interpreting(),
        Q_BLOCK=min(triton.next_power_of_2(K), 4096) if quant_in else 16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch)
    if splits > 1 and not fused:
        reduce_splits(part, y, bias, xs, w_scale)
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
