"""Fused mixture-of-experts: align (token, expert) pairs into per-expert blocks, then two
grouped GEMMs (gate/up, down) with silu_and_mul between and the top-k weights applied in the
second, all without a host sync.

Alignment: the T*k pairs are sorted by expert (stable) and each expert's run is padded to a
multiple of BLOCK_M, so every GEMM block has a single expert. ``sorted_ids`` holds the flat
pair index (t * k + j) or the pad value T*k; ``block_expert`` is -1 for blocks past the end.
The buffers have a fixed upper-bound size, so a CUDA graph can capture the whole layer.

Weights: bf16/fp16, or fp8 e4m3 with a per-tensor ([1]) or per-channel ([E, N]) scale, used
weight-only (upcast in the kernel, scale applied to the accumulator): decode of MoE layers is
bound by reading expert weights, which fp8 halves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from halserve.hal.triton import configs
from halserve.hal.triton.elementwise import silu_and_mul


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pend = padded.cumsum(0)
    pstart = pend - padded
    cstart = counts.cumsum(0) - counts
    order = torch.sort(flat, stable=True).indices
    sorted_e = flat[order]
    rank = torch.arange(n, device=dev) - cstart[sorted_e]
    num_blocks = triton.cdiv(n + num_experts * (block_m - 1), block_m)
    sorted_ids = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, pstart[sorted_e] + rank, order.to(torch.int32))
    starts = torch.arange(num_blocks, device=dev) * block_m
    be = torch.searchsorted(pend, starts, right=True)
    block_expert = torch.where(be < num_experts, be, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _moe_gemm_kernel(a_ptr, s_am, b_ptr, s_be, s_bn, bs_ptr, s_bse, c_ptr, s_cm,
                     sorted_ptr, bexp_ptr, topw_ptr, N, K, num_pairs,
                     A_DIV: tl.constexpr, MUL_W: tl.constexpr, B_SCALE: tl.constexpr, B_PER_COL: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    blk = pid // num_n
    pn = pid % num_n
    e = tl.load(bexp_ptr + blk)
    if e < 0:
        return
    rows = tl.load(sorted_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_pairs
    a_row = (rows // A_DIV).to(tl.int64)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_p = a_ptr + a_row[:, None] * s_am + rk[None, :]
    b_p = b_ptr + e.to(tl.int64) * s_be + rn[None, :].to(tl.int64) * s_bn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_p, mask=row_ok[:, None] & (rk[None, :] + k0 < K), other=0.0)
        b = tl.load(b_p, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
        a_p += BLOCK_K
        b_p += BLOCK_K
    if B_SCALE:
        if B_PER_COL:
            acc = acc * tl.load(bs_ptr + e * s_bse + rn, mask=rn < N, other=0.0)[None, :]
        else:
            acc = acc * tl.load(bs_ptr)
    if MUL_W:
        acc = acc * tl.load(topw_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(c_ptr + rows[:, None].to(tl.int64) * s_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (rn[None, :] < N))


def _grouped_gemm(a, b, b_scale, c, sorted_ids, block_expert, topw, num_pairs: int, a_div: int, mul_w: bool,
                  cfg: dict) -> None:
    E, N, K = b.shape
    num_blocks = block_expert.numel()
    grid = (num_blocks * triton.cdiv(N, cfg["BLOCK_N"]),)
    has_scale = b_scale is not None
    per_col = has_scale and b_scale.numel() > 1
    _moe_gemm_kernel[grid](
        a, a.stride(0), b, b.stride(0), b.stride(1), b_scale if has_scale else c,
        b_scale.stride(0) if per_col else 0, c, c.stride(0), sorted_ids, block_expert,
        topw if topw is not None else c, N, K, num_pairs,
        A_DIV=a_div, MUL_W=mul_w, B_SCALE=has_scale, B_PER_COL=per_col, IEEE=a.dtype == torch.float32 or configs.interpreting(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        **configs.launch_opts(cfg))


def fused_moe(x: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
              w13_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None,
              out: torch.Tensor | None = None, fixed: bool = False) -> torch.Tensor:
    """x [T, H]; topk_w/ids [T, k]; w13 [E, 2I, H]; w2 [E, H, I] -> [T, H] in x's dtype."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    if out is None:
        out = torch.empty_like(x)
    if T == 0:
        return out
    cfg = configs.moe_config(T * k, fixed)
    sorted_ids, block_expert = align(topk_ids, E, cfg["BLOCK_M"])
    n = T * k
    gate_up = torch.empty((n, two_i), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, w13_scale, gate_up, sorted_ids, block_expert, None, n, k, False, cfg)
    act = silu_and_mul(gate_up)
    down = torch.empty((n, H), dtype=torch.float32, device=x.device)
    _grouped_gemm(act, w2, w2_scale, down, sorted_ids, block_expert,
                  topk_w.reshape(-1).to(torch.float32).contiguous(), n, 1, True, cfg)
    out.copy_(down.view(T, k, H).sum(dim=1))
    return out
