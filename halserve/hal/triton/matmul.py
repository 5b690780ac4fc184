"""GEMMs in Triton: the persistent fixed-tile matmul of batch-invariant mode, and FP8 W8A8.

Persistent matmul: ``NUM_SMS`` programs walk the output tiles in a fixed order; tiles come
from ``configs.matmul_fixed_config(N, K)`` (weight shape only), and K is reduced in one
program in ascending BLOCK_K steps (no split-K), so row i of ``x @ W^T`` is bitwise the same
whatever else is in the batch.

FP8: ``a`` [M, K] e4m3 with scale [1] (per-tensor) or [M] (per-token), ``b`` [N, K] e4m3
with scale [1] or [N] (per-channel); fp32 accumulation, scales applied once at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from halserve.hal.triton import configs

FP8_MAX = 448.0  # e4m3fn


@triton.jit
def _k_steps(a_rows, b_cols, s_ak, s_bk, rm, rn, offs_k, M, N, k_lo, k_hi, IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile's product over keys [k_lo, k_hi), ascending BLOCK_K steps from a zero
    accumulator: the one reduction order of batch-invariant mode (inlined where it is called)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_rows + kk[None, :] * s_ak, mask=(rm[:, None] < M) & (kk[None, :] < k_hi), other=0.0)
        b = tl.load(b_cols + kk[:, None] * s_bk, mask=(kk[:, None] < k_hi) & (rn[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _persistent_mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, part_ptr, M, N, K, s_am, s_ak, s_bn, s_bk, s_cm, s_cn,
                          NUM_PROGS, k_per_split, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLITS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          SPLITS_INLINE: tl.constexpr = False):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_split = num_m * num_n
    total = per_split if SPLITS_INLINE else per_split * SPLITS
    offs_k = tl.arange(0, BLOCK_K)
    group = GROUP_M * num_n
    for tile in range(pid, total, NUM_PROGS):
        # tiles in groups of GROUP_M row tiles, m fastest inside a group: neighbouring programs
        # share a weight tile (read from HBM once) and, at prefill sizes, the programs in flight
        # touch GROUP_M activation tiles instead of all of them (the order of tiles never
        # changes a tile's sums, so this does not touch batch invariance)
        t = tile % per_split
        ps = tile // per_split
        first_m = (t // group) * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pm = first_m + (t % group) % gsize
        pn = (t % group) // gsize
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        a_rows = a_ptr + rm[:, None].to(tl.int64) * s_am
        b_cols = b_ptr + rn[None, :].to(tl.int64) * s_bn
        if SPLITS_INLINE:
            # every split of this tile here, one after the other, each from a zero accumulator
            # and added to the total in split order: the same operations as the fp32 partials
            # and _reduce_kernel's ordered sum, without the partials' round trip through memory
            tot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(0, SPLITS):
                k_lo = s * k_per_split
                k_hi = tl.minimum(k_lo + k_per_split, K)
                tot += _k_steps(a_rows, b_cols, s_ak, s_bk, rm, rn, offs_k, M, N, k_lo, k_hi, IEEE,
                                BLOCK_M, BLOCK_N, BLOCK_K)
            acc = tot
        else:
            k_lo = ps * k_per_split
            k_hi = tl.minimum(k_lo + k_per_split, K)
            acc = _k_steps(a_rows, b_cols, s_ak, s_bk, rm, rn, offs_k, M, N, k_lo, k_hi, IEEE,
                           BLOCK_M, BLOCK_N, BLOCK_K)
        ok = (rm[:, None] < M) & (rn[None, :] < N)
        if (SPLITS > 1) and (not SPLITS_INLINE):  # fp32 partials [S, M, N], added in split order by the reduction
            tl.store(part_ptr + (ps.to(tl.int64) * M + rm[:, None]) * N + rn[None, :], acc, mask=ok)
        else:
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptr + rm[:, None].to(tl.int64) * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
                     mask=ok)


def persistent_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, cfg: dict | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T (+ bias) with batch-invariant fixed tiles (``cfg``: another
    ``matmul_fixed_config``, for the benchmark sweep)."""
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    base = configs.matmul_fixed_config(N, K)
    # the large-row form is sized for 16-bit tiles (fp32 ones would not fit shared memory)
    cfg = cfg or configs.matmul_fixed_config(N, K, M if x.element_size() <= 2 else None)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    cfg = _fit_stages(cfg, (bm * bk + bk * bn) * x.element_size())
    # the split count (a row's order of sums) always from the row-count-free config
    splits = cfg.get("SPLITS") or fixed_splits(N, K, base["BLOCK_N"], base["BLOCK_K"])
    # split boundaries in the row-count-free config's BLOCK_K (a form with another BLOCK_K
    # must not move them)
    k_per_split = triton.cdiv(triton.cdiv(K, splits), base["BLOCK_K"]) * base["BLOCK_K"]
    inline = bool(cfg.get("SPLITS_INLINE")) and splits > 1
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn) * (1 if inline else splits)
    progs = min(tiles, configs.num_sms() * cfg.get("PROGS_PER_SM", 2))
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 and not inline else out
    _persistent_mm_kernel[(progs,)](
        x, w, out, bias if bias is not None else x, part, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        out.stride(0), out.stride(1), progs, k_per_split, HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32 or configs.interpreting(), SPLITS=splits,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 8), SPLITS_INLINE=inline,
        **configs.launch_opts(cfg))
    if splits > 1 and not inline:
        from halserve.hal.triton.skinny import reduce_splits

        reduce_splits(part, out, bias)
    return out


# shared memory one NVIDIA block may use, by family (the configs are sized for 16-bit tiles)
_SMEM = {"hopper+": 227 * 1024, "ampere": 163 * 1024}


def _fit_stages(cfg: dict, stage_bytes: int) -> dict:
    """Fewer pipeline stages where the tiles would not fit shared memory (fp32 inputs: e.g. the
    lm_head's 64 x 128 x 128 tiles need 288 KiB at 4 stages on sm_90). Stages only overlap loads
    with the dots: a row's sums are unchanged."""
    limit = _SMEM.get(configs._family(configs.arch()))
    stages = cfg["num_stages"]
    while limit and stages > 2 and stage_bytes * (stages - 1) > limit:
        stages -= 1
    return cfg if stages == cfg["num_stages"] else dict(cfg, num_stages=stages)


def fixed_splits(n: int, k: int, block_n: int, block_k: int) -> int:
    """Split-K count from the weight's shape only (batch-invariant): split while the column
    tiles alone leave SMs idle at M=1 and every split keeps at least four K steps (on the
    H200, splitting shapes that already have a tile per SM cost more at M=64 than it gained)."""
    if configs.interpreting():
        return 2 if k >= 4 * block_k else 1
    tiles, splits, sms = triton.cdiv(n, block_n), 1, configs.num_sms()
    while tiles * splits < sms and k // (splits * 2) >= 4 * block_k:
        splits *= 2
    return splits


# ---- FP8 ----------------------------------------------------------------------------------------
@triton.jit
def _fp8_mm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, s_am, s_bn, s_cm,
                   A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   UPCAST: tl.constexpr, W_ONLY: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (pid % group) % gsize
    pn = (pid % group) // gsize
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_p = a_ptr + rm[:, None].to(tl.int64) * s_am + rk[None, :]
    b_p = b_ptr + rn[None, :].to(tl.int64) * s_bn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if QUANT:
        # dynamic activation quantization fused in (small M, one M tile): every program
        # computes the same scales from the tiny activation block, read from L2
        amax = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_p + k0, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
        if not A_PER_ROW:
            amax = tl.zeros([BLOCK_M], tl.float32) + tl.max(amax, axis=0)
        qs = tl.maximum(amax, 1e-12) / 448.0
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_p, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
        b = tl.load(b_p, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
        if QUANT:
            a = tl.clamp(a.to(tl.float32) / qs[:, None], -448.0, 448.0).to(b.dtype)
        if W_ONLY:  # a is bf16/fp16/fp32: upcast the fp8 weight tile
            if UPCAST or IEEE:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.to(a.dtype), acc)
        elif UPCAST:  # interpreter / pre-sm_89: no fp8 dot
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_p += BLOCK_K
        b_p += BLOCK_K
    if W_ONLY:
        sa = 1.0
    elif QUANT:
        sa = qs[:, None]
    elif A_PER_ROW:
        sa = tl.load(as_ptr + rm, mask=rm < M, other=0.0)[:, None]
    else:
        sa = tl.load(as_ptr)
    if B_PER_COL:
        sb = tl.load(bs_ptr + rn, mask=rn < N, other=0.0)[None, :]
    else:
        sb = tl.load(bs_ptr)
    acc = acc * sa * sb
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * s_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, fixed: bool = False) -> torch.Tensor:
    """a_scale None: ``a`` is not quantized (weight-only fp8: the weight tile is upcast).
    ``fixed``: one config for every M (batch-invariant mode)."""
    M, K = a.shape
    N = b.shape[0]
    assert a.stride(1) == 1 and b.stride(1) == 1
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return out
    cfg = configs.fp8_matmul_config(64 if fixed else M, N, K)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    upcast = configs.interpreting() or configs.arch() in ("sm80", "sm86", "sm87")
    w_only = a_scale is None
    _fp8_mm_kernel[grid](a, b, out, b_scale if w_only else a_scale, b_scale,
                         bias if bias is not None else out, M, N, K,
                         a.stride(0), b.stride(0), out.stride(0), W_ONLY=w_only, QUANT=False,
                         IEEE=a.dtype == torch.float32,
                         A_PER_ROW=not w_only and a_scale.numel() > 1, B_PER_COL=b_scale.numel() > 1, HAS_BIAS=bias is not None,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], UPCAST=upcast,
                         **configs.launch_opts(cfg))
    return out


@triton.jit
def _quant_per_token_kernel(x_ptr, s_x, q_ptr, s_q, scale_ptr, K, BLOCK: tl.constexpr, QMAX: tl.constexpr = 448.0):
    row = tl.program_id(0).to(tl.int64)
    amax = 0.0
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * s_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    scale = tl.maximum(amax, 1e-12) / QMAX
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * s_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        qv = tl.clamp(x / scale, -QMAX, QMAX)
        tl.store(q_ptr + row * s_q + cols, qv.to(q_ptr.dtype.element_ty), mask=cols < K)


def quant_fp8_per_token(x: torch.Tensor, fp8_dtype: "torch.dtype | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], scale [M] fp32) with x ~= q * scale[:, None]. ``fp8_dtype``:
    float8_e4m3fn (default) or float8_e4m3fnuz (AMD gfx942, largest finite 240)."""
    M, K = x.shape
    fp8_dtype = fp8_dtype or torch.float8_e4m3fn
    qmax = float(torch.finfo(fp8_dtype).max)
    if configs.interpreting():  # the interpreter rounds fp8 wrongly at binade edges
        s = (x.float().abs().amax(dim=1).clamp(min=1e-12) / qmax)
        return (x.float() / s[:, None]).clamp(-qmax, qmax).to(fp8_dtype), s
    q = torch.empty((M, K), dtype=fp8_dtype, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M:
        BLOCK = min(triton.next_power_of_2(K), 4096)
        _quant_per_token_kernel[(M,)](x, x.stride(0), q, q.stride(0), s, K, BLOCK=BLOCK, QMAX=qmax, num_warps=8)
    return q, s


def quant_fp8_per_tensor(x: torch.Tensor, fp8_dtype: "torch.dtype | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor quantization without a host sync."""
    fp8_dtype = fp8_dtype or torch.float8_e4m3fn
    qmax = float(torch.finfo(fp8_dtype).max)
    s = (x.abs().amax().float().clamp(min=1e-12) / qmax).reshape(1)
    q = (x.float() / s).clamp(-qmax, qmax).to(fp8_dtype)
    return q, s


def fp8_matmul_fused_quant(x: torch.Tensor, per_token: bool, b: torch.Tensor, b_scale: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 for small M (decode): x [M<=16, K] bf16/fp16 is quantized inside the GEMM
    (per-token or per-tensor, same formula as ``quant_fp8_per_token``), saving a launch and
    a round trip per linear. Config: enough column tiles to keep every SM streaming B."""
    M, K = x.shape
    N = b.shape[0]
    assert M <= 16 and x.stride(1) == 1 and b.stride(1) == 1
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = configs.fp8_small_m_config(N, K)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    _fp8_mm_kernel[grid](x, b, out, b_scale, b_scale, bias if bias is not None else out, M, N, K,
                         x.stride(0), b.stride(0), out.stride(0), A_PER_ROW=per_token,
                         B_PER_COL=b_scale.numel() > 1, HAS_BIAS=bias is not None, BLOCK_M=16,
                         BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=1, UPCAST=False, W_ONLY=False,
                         QUANT=True, IEEE=False, **configs.launch_opts(cfg))
    return out
