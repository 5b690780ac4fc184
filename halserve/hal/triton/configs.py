"""Per-architecture launch configs for the shared Triton kernels.

One place to tune: the kernels take their tile sizes from here, keyed by an arch string
("sm90", "sm89", "sm80", "sm100", "gfx942", "gfx950", "interp"). Batch-invariant mode uses
``FIXED`` configs that never depend on the number of tokens in the batch.
"""
from __future__ import annotations

import functools
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def arch(device_index: int = 0) -> str:
    if interpreting():
        return "interp"
    import torch

    props = torch.cuda.get_device_properties(device_index)
    if getattr(torch.version, "hip", None):  # CUDA builds also have gcnArchName (the card's name)
        return (getattr(props, "gcnArchName", "") or "gfx").split(":")[0]
    return f"sm{props.major}{props.minor}"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    if interpreting():
        return 4
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _family(a: str) -> str:
    if a == "interp":
        return "interp"
    if a.startswith("gfx"):
        return "cdna"
    major = int(a[2:-1]) if len(a) > 3 else int(a[2])
    return "hopper+" if major >= 9 else "ampere"


# ---- attention ---------------------------------------------------------------------------
# block_m: rows per program (query tokens x GQA heads of one KV head); block_n: keys per step.
ATTN = {
    "hopper+": dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
    "ampere": dict(block_m=64, block_n=32, num_warps=4, num_stages=2),
    "cdna": dict(block_m=64, block_n=32, num_warps=4, num_stages=1),
    "interp": dict(block_m=16, block_n=16, num_warps=1, num_stages=1),
}
ATTN_DECODE = {
    "hopper+": dict(block_n=64, num_warps=4, num_stages=2),
    "ampere": dict(block_n=32, num_warps=4, num_stages=2),
    "cdna": dict(block_n=32, num_warps=4, num_stages=1),
    "interp": dict(block_n=16, num_warps=1, num_stages=1),
}


def attn_config(decode: bool) -> dict:
    fam = _family(arch())
    return dict((ATTN_DECODE if decode else ATTN)[fam])


# ---- persistent matmul (batch-invariant) ------------------------------------------------------
def matmul_fixed_config(n: int, k: int) -> dict:
    """Tiles depend on the weight's shape only (never on M), so a row's result is the same in
    any batch. BLOCK_N shrinks until there are enough column tiles to fill the chip at M=1."""
    fam = _family(arch())
    if fam == "interp":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
    sms = num_sms()
    bn = 128
    while bn > 32 and (n + bn - 1) // bn < sms:
        bn //= 2
    stages = 4 if fam == "hopper+" else 3
    return dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=stages)


# ---- fp8 GEMM --------------------------------------------------------------------------------
def fp8_matmul_config(m: int, n: int, k: int) -> dict:
    fam = _family(arch())
    if fam == "interp":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=4, num_warps=1, num_stages=1)
    if m <= 16:
        bn = 64 if (n + 63) // 64 >= 2 * num_sms() else 32
        return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def fp8_small_m_config(n: int, k: int) -> dict:
    """Decode-sized fp8 GEMM (M <= 16): one row of column tiles, at least ~one per SM."""
    if _family(arch()) == "interp":
        return dict(BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)
    bn = 64 if (n + 63) // 64 >= 2 * num_sms() else 32
    return dict(BLOCK_N=bn, BLOCK_K=256, num_warps=4, num_stages=4)


# ---- fused MoE ---------------------------------------------------------------------------------
def moe_config(m_tokens: int, fixed: bool = False) -> dict:
    fam = _family(arch())
    if fam == "interp":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
    if fixed or m_tokens > 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
