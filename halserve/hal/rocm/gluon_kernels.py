"""Gluon kernels for AMD CDNA, with explicit MFMA layouts: the paged decode attention and
the FP8 W8A8 GEMM.

In Triton the compiler picks the MFMA shape and operand layouts; here the kernel names them
(``AMDMFMALayout(version 3 = gfx942 / 4 = gfx950, instr_shape, transposed, warps)`` and its
``DotOperandLayout`` operands with the arch's ``k_width``), so a decode program holds all GQA
heads of a KV head in one 16-row MFMA tile and the softmax runs in the accumulator's own
layout without a round trip through LDS.

Each kernel body takes its layouts and its matrix op as constexprs: ``layouts(arch)`` gives
the AMD ones ('gfx942', 'gfx950': ``mfma``), and 'sm90' the NVIDIA ones (``mma_v2`` with an
NVMMADistributedLayout), so the very same body runs on an NVIDIA GPU to check its results
(bench/device/h18.sh). What that cannot check: the AMD layouts' own lowering on hardware.
Gluon does not run in the Triton interpreter. Not wired into RocmBackend's dispatch yet:
the Triton kernels serve every op until these are measured on an AMD GPU.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl

_LOG2E = 1.4426950408889634
_WARPS = 4


def layouts(arch: str, kind: str, dtype_bits: int) -> dict:
    """Constexpr layouts for ``kind`` 'gemm' or 'attn' on ``arch`` ('gfx942', 'gfx950', 'sm90')."""
    if arch.startswith("gfx"):
        version = 3 if arch == "gfx942" else 4
        if dtype_bits == 8:
            # fp8 MFMA 16x16x32 on both (fnuz on gfx942, OCP on gfx950); gfx950's 16x16x128
            # f8f6f4 form is reached in Gluon only through mfma_scaled, not used here
            k, kw = 32, 8
        else:  # bf16/fp16: 16x16x16 (cdna3); 16x16x32 (cdna4)
            k = 16 if version == 3 else 32
            kw = 4 if version == 3 else 8
        warps = [_WARPS, 1] if kind == "gemm" else [1, _WARPS]
        mma = ttgl.amd.AMDMFMALayout(version=version, instr_shape=[16, 16, k], transposed=True, warps_per_cta=warps)
        op = "mfma"
        lanes = 64
    else:  # NVIDIA instantiation of the same body: mma.sync m16n8
        kw = 4 if dtype_bits == 8 else 2
        warps = [_WARPS, 1] if kind == "gemm" else [1, _WARPS]
        mma = ttgl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=warps, instr_shape=[16, 8])
        op = "mma_v2"
        lanes = 32
    load = ttgl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[lanes // 8, 8], warps_per_cta=[_WARPS, 1],
                              order=[1, 0])
    return dict(MMA=mma, A_OP=ttgl.DotOperandLayout(operand_index=0, parent=mma, k_width=kw),
                B_OP=ttgl.DotOperandLayout(operand_index=1, parent=mma, k_width=kw), LOAD=load, OP=op)


@gluon.jit
def _mma(a, b, acc, OP: ttgl.constexpr):
    if OP == "mfma":
        return ttgl.amd.cdna3.mfma(a, b, acc)
    else:
        return ttgl.nvidia.ampere.mma_v2(a, b, acc)


# ---- FP8 W8A8 GEMM --------------------------------------------------------------------------------
@gluon.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, s_am, s_bn, s_cm,
                    A_PER_ROW: ttgl.constexpr, B_PER_COL: ttgl.constexpr,
                    BLOCK_M: ttgl.constexpr, BLOCK_N: ttgl.constexpr, BLOCK_K: ttgl.constexpr,
                    MMA: ttgl.constexpr, A_OP: ttgl.constexpr, B_OP: ttgl.constexpr, LOAD: ttgl.constexpr,
                    OP: ttgl.constexpr):
    """c = (a[M,K] @ b[N,K]^T) * a_scale * b_scale; a, b fp8; c bf16/fp16/fp32."""
    pm = ttgl.program_id(0)
    pn = ttgl.program_id(1)
    rm = pm * BLOCK_M + ttgl.arange(0, BLOCK_M, layout=ttgl.SliceLayout(1, LOAD))
    rk = ttgl.arange(0, BLOCK_K, layout=ttgl.SliceLayout(0, LOAD))
    rn = pn * BLOCK_N + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(1, LOAD))
    a_p = a_ptr + ttgl.expand_dims(rm.to(ttgl.int64) * s_am, 1) + ttgl.expand_dims(rk, 0)
    b_p = b_ptr + ttgl.expand_dims(rn.to(ttgl.int64) * s_bn, 1) + ttgl.expand_dims(rk, 0)  # [BN, BK]
    acc = ttgl.zeros([BLOCK_M, BLOCK_N], ttgl.float32, layout=MMA)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ttgl.expand_dims(rk + k0 < K, 0)
        a = ttgl.load(a_p, mask=ttgl.expand_dims(rm < M, 1) & k_ok, other=0.0)
        b = ttgl.load(b_p, mask=ttgl.expand_dims(rn < N, 1) & k_ok, other=0.0)
        acc = _mma(ttgl.convert_layout(a, A_OP), ttgl.convert_layout(ttgl.permute(b, [1, 0]), B_OP), acc, OP)
        a_p += BLOCK_K
        b_p += BLOCK_K
    om = pm * BLOCK_M + ttgl.arange(0, BLOCK_M, layout=ttgl.SliceLayout(1, MMA))
    on = pn * BLOCK_N + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(0, MMA))
    if A_PER_ROW:
        acc = acc * ttgl.expand_dims(ttgl.load(as_ptr + om, mask=om < M, other=0.0), 1)
    else:
        acc = acc * ttgl.load(as_ptr)
    if B_PER_COL:
        acc = acc * ttgl.expand_dims(ttgl.load(bs_ptr + on, mask=on < N, other=0.0), 0)
    else:
        acc = acc * ttgl.load(bs_ptr)
    c_p = c_ptr + ttgl.expand_dims(om.to(ttgl.int64) * s_cm, 1) + ttgl.expand_dims(on, 0)
    ttgl.store(c_p, acc.to(c_ptr.dtype.element_ty), mask=ttgl.expand_dims(om < M, 1) & ttgl.expand_dims(on < N, 0))


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype, arch: str, out: "torch.Tensor | None" = None) -> torch.Tensor:
    """a [M, K] fp8, scale [1] or [M]; b [N, K] fp8, scale [1] or [N] -> [M, N]."""
    M, K = a.shape
    N = b.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    grid, kw = fp8_gemm_launch(a, a_scale, b, b_scale, out, arch)
    fp8_gemm_kernel[grid](a, b, out, a_scale, b_scale, M, N, K, a.stride(0), b.stride(0), out.stride(0), **kw)
    return out


def fp8_gemm_launch(a, a_scale, b, b_scale, out, arch: str):
    M, N = out.shape
    bm, bn, bk = 64, 64, 128
    kw = dict(A_PER_ROW=a_scale.numel() > 1, B_PER_COL=b_scale.numel() > 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
              num_warps=_WARPS, **layouts(arch, "gemm", 8))
    return ((M + bm - 1) // bm, (N + bn - 1) // bn), kw


# ---- paged decode attention ------------------------------------------------------------------------
@gluon.jit
def decode_attention_kernel(q_ptr, q_st, q_sh, k_ptr, v_ptr, c_sb, c_st, c_sh, o_ptr, o_st, o_sh,
                            seq_lens_ptr, bt_ptr, bt_stride, scale_log2,
                            G: ttgl.constexpr, PAGE: ttgl.constexpr, HEAD_D: ttgl.constexpr,
                            BLOCK_M: ttgl.constexpr, BLOCK_N: ttgl.constexpr,
                            MMA: ttgl.constexpr, A_OP: ttgl.constexpr, B_OP: ttgl.constexpr, LOAD: ttgl.constexpr,
                            OP: ttgl.constexpr):
    """One program per (sequence, KV head): its G query heads are the rows of one MFMA tile
    (BLOCK_M >= G), keys stream in BLOCK_N tiles through the block table, online softmax in
    the accumulator's layout. q [B, Hq, D] (one new token per sequence), cache
    [2, blocks, PAGE, Hk, D]."""
    seq = ttgl.program_id(0)
    kvh = ttgl.program_id(1)
    seq_len = ttgl.load(seq_lens_ptr + seq)
    rows = ttgl.arange(0, BLOCK_M, layout=ttgl.SliceLayout(1, LOAD))
    d = ttgl.arange(0, HEAD_D, layout=ttgl.SliceLayout(0, LOAD))
    head = kvh * G + rows
    q_p = q_ptr + seq.to(ttgl.int64) * q_st + ttgl.expand_dims(head * q_sh, 1) + ttgl.expand_dims(d, 0)
    q = ttgl.load(q_p, mask=ttgl.expand_dims(rows < G, 1), other=0.0)
    q = ttgl.convert_layout(q, A_OP)

    m_i = ttgl.full([BLOCK_M], float("-inf"), ttgl.float32, layout=ttgl.SliceLayout(1, MMA))
    l_i = ttgl.zeros([BLOCK_M], ttgl.float32, layout=ttgl.SliceLayout(1, MMA))
    acc = ttgl.zeros([BLOCK_M, HEAD_D], ttgl.float32, layout=MMA)
    kn = ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(1, LOAD))  # key index along tile rows
    sn = ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(0, MMA))  # key index along score columns
    bt_row = bt_ptr + seq.to(ttgl.int64) * bt_stride
    for n0 in range(0, seq_len, BLOCK_N):
        kpos = n0 + kn
        k_ok = kpos < seq_len
        blk = ttgl.load(bt_row + kpos // PAGE, mask=k_ok, other=0).to(ttgl.int64)
        off = ttgl.expand_dims(blk * c_sb + (kpos % PAGE) * c_st + kvh * c_sh, 1) + ttgl.expand_dims(d, 0)
        kt = ttgl.load(k_ptr + off, mask=ttgl.expand_dims(k_ok, 1), other=0.0)  # [BLOCK_N, D]
        vt = ttgl.load(v_ptr + off, mask=ttgl.expand_dims(k_ok, 1), other=0.0)
        s = _mma(q, ttgl.convert_layout(ttgl.permute(kt, [1, 0]), B_OP),
                 ttgl.zeros([BLOCK_M, BLOCK_N], ttgl.float32, layout=MMA), OP)
        s = s * scale_log2
        s = ttgl.where(ttgl.expand_dims(n0 + sn < seq_len, 0), s, float("-inf"))
        m_new = ttgl.maximum(m_i, ttgl.max(s, 1))
        alpha = ttgl.exp2(m_i - m_new)
        p = ttgl.exp2(s - ttgl.expand_dims(m_new, 1))
        l_i = l_i * alpha + ttgl.sum(p, 1)
        acc = acc * ttgl.expand_dims(alpha, 1)
        acc = _mma(ttgl.convert_layout(p.to(vt.dtype), A_OP), ttgl.convert_layout(vt, B_OP), acc, OP)
        m_i = m_new
    out = acc / ttgl.expand_dims(l_i, 1)
    orow = ttgl.arange(0, BLOCK_M, layout=ttgl.SliceLayout(1, MMA))
    od = ttgl.arange(0, HEAD_D, layout=ttgl.SliceLayout(0, MMA))
    o_p = o_ptr + seq.to(ttgl.int64) * o_st + ttgl.expand_dims((kvh * G + orow) * o_sh, 1) + ttgl.expand_dims(od, 0)
    ttgl.store(o_p, out.to(o_ptr.dtype.element_ty), mask=ttgl.expand_dims(orow < G, 1))


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                     scale: float, arch: str, out: "torch.Tensor | None" = None) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence, every seq_len >= 1) -> [B, Hq, D]."""
    if out is None:
        out = torch.empty_like(q)
    grid, args, kw = decode_attention_launch(q, kv_cache, seq_lens, block_tables, scale, out, arch)
    decode_attention_kernel[grid](*args, **kw)
    return out


def decode_attention_launch(q, kv_cache, seq_lens, block_tables, scale, out, arch: str):
    B, HQ, D = q.shape
    HK = kv_cache.shape[-2]
    G = HQ // HK
    assert D in (64, 128, 256) and G <= 16, f"decode_attention: head_dim {D} / group {G} not supported"
    k, v = kv_cache[0], kv_cache[1]
    args = (q, q.stride(0), q.stride(1), k, v, k.stride(0), k.stride(1), k.stride(2), out, out.stride(0),
            out.stride(1), seq_lens, block_tables, block_tables.stride(0), float(scale) * _LOG2E)
    kw = dict(G=G, PAGE=kv_cache.shape[2], HEAD_D=D, BLOCK_M=16, BLOCK_N=64, num_warps=_WARPS,
              **layouts(arch, "attn", q.element_size() * 8))
    return (B, HK), args, kw


def aot_launches(arch: str, fp8: torch.dtype):
    """Launch descriptions for ahead-of-time compiles (CPU tensors, the engine's shapes)."""
    B, HQ, HK, D, BS = 4, 32, 8, 128, 16
    q = torch.zeros(B, HQ, D, dtype=torch.bfloat16)
    kv = torch.zeros(2, 64, BS, HK, D, dtype=torch.bfloat16)
    seq = torch.full((B,), 200, dtype=torch.int32)
    bt = torch.zeros(B, 16, dtype=torch.int32)
    grid, args, kw = decode_attention_launch(q, kv, seq, bt, D ** -0.5, torch.empty_like(q), arch)
    out = [("gluon paged decode attention (B=4, 32/8 heads, D=128, bf16)", decode_attention_kernel, args, kw)]
    M, N, K = 256, 4096, 4096
    a = torch.zeros(M, K, dtype=fp8)
    b = torch.zeros(N, K, dtype=fp8)
    c = torch.empty(M, N, dtype=torch.bfloat16)
    sa, sb = torch.ones(M), torch.ones(N)
    grid, kw = fp8_gemm_launch(a, sa, b, sb, c, arch)
    out.append(("gluon fp8 W8A8 GEMM (M=256, N=4096, K=4096, per-token x per-channel)", fp8_gemm_kernel,
                (a, b, c, sa, sb, M, N, K, a.stride(0), b.stride(0), c.stride(0)), kw))
    return out
