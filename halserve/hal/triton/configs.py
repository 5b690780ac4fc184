"""Per-architecture launch configs for the shared Triton kernels.

One place to tune: the kernels take their tile sizes from here, keyed by an arch string
("sm90", "sm89", "sm80", "sm100", "gfx942", "gfx950", "interp"). Batch-invariant mode uses
``FIXED`` configs that never depend on the number of tokens in the batch.
"""
from __future__ import annotations

import contextlib
import functools
import os

# AMD Instinct facts the configs depend on: compute units (the "SMs" of split decisions) and
# LDS bytes per CU (the shared-memory limit a tile set must fit).
CDNA = {
    "gfx942": dict(family="cdna3", cus=304, lds=64 * 1024, fp8="e4m3fnuz"),   # MI300X
    "gfx950": dict(family="cdna4", cus=256, lds=160 * 1024, fp8="e4m3fn"),    # MI350X / MI355X
}
# HIP-only compile options a config may carry (other targets reject them as launch kwargs)
HIP_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")

_forced: "str | None" = None
_forced_hip = False  # ahead-of-time compiles for a HIP target: configs carry their HIP options


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def forced_arch(a: "str | None", hip: bool = False):
    """Choose configs for arch ``a`` whatever the device is (the rocm backend on a machine
    without an AMD GPU: the interpreter, an NVIDIA GPU, or ahead-of-time compiles, where
    ``hip=True`` keeps the HIP-only options in ``launch_opts``)."""
    global _forced, _forced_hip
    prev, _forced = (_forced, _forced_hip), a
    _forced_hip = hip
    try:
        yield
    finally:
        _forced, _forced_hip = prev


def arch(device_index: int = 0) -> str:
    if _forced is not None:
        return _forced
    if interpreting():
        return "interp"
    return _device_arch(device_index)


@functools.lru_cache(maxsize=None)
def _device_arch(device_index: int = 0) -> str:
    import torch

    props = torch.cuda.get_device_properties(device_index)
    if getattr(torch.version, "hip", None):  # CUDA builds also have gcnArchName (the card's name)
        return (getattr(props, "gcnArchName", "") or "gfx").split(":")[0]
    return f"sm{props.major}{props.minor}"


def num_sms(device_index: int = 0) -> int:
    if _forced in CDNA:
        return CDNA[_forced]["cus"]
    if interpreting():
        return 4
    return _device_sms(device_index)


@functools.lru_cache(maxsize=None)
def _device_sms(device_index: int = 0) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def on_hip() -> bool:
    """True when kernels are really compiled for an AMD GPU (not forced configs elsewhere)."""
    if _forced_hip:
        return True
    if interpreting():
        return False
    import torch

    return bool(getattr(torch.version, "hip", None))


def launch_opts(cfg: dict) -> dict:
    """The compile options of a config for ``kernel[grid](..., **opts)``: num_warps and
    num_stages everywhere, the HIP-only options only when compiling for an AMD GPU."""
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if on_hip():
        opts.update({k: cfg[k] for k in HIP_OPTIONS if k in cfg})
    return opts


def _family(a: str) -> str:
    if a == "interp":
        return "interp"
    if a.startswith("gfx"):
        return CDNA.get(a, CDNA["gfx942"])["family"]
    major = int(a[2:-1]) if len(a) > 3 else int(a[2])
    return "hopper+" if major >= 9 else "ampere"


# ---- attention ---------------------------------------------------------------------------
# block_m: rows per program (query tokens x GQA heads of one KV head); block_n: keys per step.
ATTN = {
    "hopper+": dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
    "ampere": dict(block_m=64, block_n=32, num_warps=4, num_stages=2),
    # CDNA: wave64, 16x16 MFMA tiles (matrix_instr_nonkdim=16) suit the GQA-packed rows; the
    # loop is software-pipelined by the stream pipeliner (num_stages=2), two waves per SIMD
    "cdna3": dict(block_m=64, block_n=32, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16,
                  kpack=1),
    "cdna4": dict(block_m=64, block_n=64, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16,
                  kpack=1),
    "interp": dict(block_m=16, block_n=16, num_warps=1, num_stages=1),
}
ATTN_DECODE = {
    "hopper+": dict(block_n=64, num_warps=4, num_stages=2),
    "ampere": dict(block_n=32, num_warps=4, num_stages=2),
    "cdna3": dict(block_n=64, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16, kpack=1),
    "cdna4": dict(block_n=64, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16, kpack=1),
    "interp": dict(block_n=16, num_warps=1, num_stages=1),
}


def attn_config(decode: bool) -> dict:
    fam = _family(arch())
    return dict((ATTN_DECODE if decode else ATTN)[fam])


# ---- persistent matmul (batch-invariant) ------------------------------------------------------
# Batch-invariant GEMM at prefill sizes (M >= BI_LARGE_M_ROWS, 16-bit inputs): overrides that
# keep every row's bits. A row's sums are the same k-steps of the same BLOCK_K in the same
# order, per split of the row-count-free split count, then the splits added in order; only the
# output tile, warps and pipelining change (tests/gpu/test_bi_gemm_gpu.py compares a row's bits
# at M = 1, 64, 300, 4096). By arch (a new MMA generation must earn its own entry), then family.
BI_LARGE_M: dict = {
    # Each part shown on the H200 or exact by construction: BLOCK_M 128 / 8 warps / 3 stages
    # kept every row's bits in the 19:31 GPU run (commit 760d97d) on the four 8B shapes,
    # gate_up at BLOCK_N 128, the others at their BLOCK_N 32; SPLITS_INLINE (a tile's K splits
    # added inside the program) is the reduction kernel's fp32 adds in the same order. Compiled
    # for sm_90 here without spills (bench/device/biatt_sm90.py). BLOCK_N 128 on every shape
    # (514-566 TFLOP/s in the H200 sweep without split-K, vs 198-431 for the decode form and
    # cuBLAS 786-804) waits for tests/gpu/test_bi_gemm_gpu.py's "candidate" on the H200.
    "sm90": dict(BLOCK_M=128, num_warps=8, num_stages=3, SPLITS_INLINE=True),
}
BI_LARGE_M_ROWS = 256


def matmul_fixed_config(n: int, k: int, m: "int | None" = None) -> dict:
    """Tiles depend on the weight's shape only, so a row's result is the same in any batch.
    BLOCK_N shrinks until there are enough column tiles to fill the chip at M=1. ``m``: the
    row count, which may only pick a ``BI_LARGE_M`` form (bitwise the same rows)."""
    base = _matmul_fixed_config(n, k)
    over = BI_LARGE_M.get(arch()) or BI_LARGE_M.get(_family(arch()))
    if over and m is not None and m >= BI_LARGE_M_ROWS:
        base.update(over)
    return base


def _matmul_fixed_config(n: int, k: int) -> dict:
    fam = _family(arch())
    if fam == "interp":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
    sms = num_sms()
    bn = 128
    while bn > 32 and (n + bn - 1) // bn < sms:
        bn //= 2
    if fam == "cdna3":  # 64 KiB LDS: BLOCK_K 64 keeps two stages of A and B tiles inside it
        return dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=64, num_warps=4, num_stages=2, matrix_instr_nonkdim=16,
                    kpack=2, waves_per_eu=0)
    if fam == "cdna4":
        return dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=2, matrix_instr_nonkdim=16,
                    kpack=1, waves_per_eu=0)
    stages = 4 if fam == "hopper+" else 3
    return dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=stages)


# ---- fp8 GEMM --------------------------------------------------------------------------------
def fp8_matmul_config(m: int, n: int, k: int) -> dict:
    fam = _family(arch())
    if fam == "interp":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=4, num_warps=1, num_stages=1)
    if fam in ("cdna3", "cdna4"):
        return _cdna_fp8_config(fam, m, n)
    if m <= 16:
        bn = 64 if (n + 63) // 64 >= 2 * num_sms() else 32
        return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def _cdna_fp8_config(fam: str, m: int, n: int) -> dict:
    # fp8 MFMA: 16x16x32 (cdna3) / 16x16x128 (cdna4) for skinny tiles, 32x32 for big ones;
    # cdna3's 64 KiB LDS caps the big tile at BLOCK_K 64 with two stages
    hip = dict(waves_per_eu=0, kpack=1)
    if m <= 16:
        bn = 64 if (n + 63) // 64 >= 2 * num_sms() else 32
        return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=2,
                    matrix_instr_nonkdim=16, **hip)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=2,
                    matrix_instr_nonkdim=16, **hip)
    bk = 64 if fam == "cdna3" else 128
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=2,
                matrix_instr_nonkdim=32, **hip)


def fp8_small_m_config(n: int, k: int) -> dict:
    """Decode-sized fp8 GEMM (M <= 16): one row of column tiles, at least ~one per SM."""
    if _family(arch()) == "interp":
        return dict(BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)
    bn = 64 if (n + 63) // 64 >= 2 * num_sms() else 32
    return dict(BLOCK_N=bn, BLOCK_K=256, num_warps=4, num_stages=4)


# ---- skinny (decode) GEMM: hal/triton/skinny.py --------------------------------------------------
# Winners of the H200 sweep (``bench/skinny_gemm.py --sweep``), by (weights "fp8"|"bf16", row
# bucket 1|4|16, N, K); "bf16" entries are the shapes where streaming beat cuBLAS (none: cuBLAS
# was within 2-6% on every shape, docs/performance.md). fp8 W8A8 per-channel x per-token,
# run s4call1 (bench/device/sweep8.sh, NVIDIA H200, 2026-12-04 21:08 UTC, read bandwidth
# 4,374 GB/s): the fastest stage-A/B config per shape, every one NMSE-checked against torch on
# the GPU; us per call incl. any quantize/reduce kernel, and what the table replaced ("default":
# tensor-core tiles, separate quantize and reduce kernels) in brackets:
#   M=1   8B qkv 12.0 (12.3)  o 10.1 (11.5)  gate_up 35.9 (39.2)  down 24.1 (28.0)
#         1B qkv 7.0 (9.4)    o 6.3 (9.0)    gate_up 13.8 (17.4)  down 10.6 (12.4)
#   M=4   8B qkv 12.8 (13.7)  o 11.0 (12.1)  gate_up 34.0 (39.3)  down 24.6 (27.9)
#   M=16  8B qkv 13.0 (15.1)  o 11.3 (11.8)  gate_up 34.8 (41.1)  down 25.7 (28.7)
# Left out: QUANT_IN in the tensor-core form - its amax pass then read 16-row x 256 tiles, up
# to 56 dependent steps a program (gate_up 55 us, down 49 us at M=1); ``fp8_tiled`` at M=16
# (9.6-24.6 us) was timed without its quantize kernel, so it is not comparable. The in-kernel
# amax pass of the gemv entries was rewritten after this run (one row at a time, the same max):
# interpreter-checked and compiled for sm_90 (bench/skinny_regs.py --table), not re-timed; the
# gemvr and PDL forms are in no entry (bench/device/fp8.sh times them; not run yet).
_G = dict(KIND="gemv", num_warps=4, num_stages=1)
_D = dict(KIND="dot", num_warps=4)
SKINNY_TUNED: dict = {"sm90": {
    ("fp8", 1, 6144, 4096): dict(_G, BLOCK_N=16, BLOCK_K=512, SPLITS=1, FUSED=False, QUANT_IN=True),
    ("fp8", 1, 4096, 4096): dict(_G, BLOCK_N=16, BLOCK_K=512, SPLITS=2, FUSED=True, QUANT_IN=True),
    ("fp8", 1, 28672, 4096): dict(_D, BLOCK_N=64, BLOCK_K=512, SPLITS=1, FUSED=False, QUANT_IN=False, num_stages=3),
    ("fp8", 1, 4096, 14336): dict(_D, BLOCK_N=32, BLOCK_K=256, SPLITS=4, FUSED=True, QUANT_IN=False, num_stages=4),
    ("fp8", 1, 3072, 2048): dict(_G, BLOCK_N=16, BLOCK_K=256, SPLITS=4, FUSED=False, QUANT_IN=True),
    ("fp8", 1, 2048, 2048): dict(_G, BLOCK_N=16, BLOCK_K=512, SPLITS=4, FUSED=False, QUANT_IN=True),
    ("fp8", 1, 16384, 2048): dict(_D, BLOCK_N=32, BLOCK_K=256, SPLITS=1, FUSED=False, QUANT_IN=False, num_stages=4),
    ("fp8", 1, 2048, 8192): dict(_G, BLOCK_N=16, BLOCK_K=512, SPLITS=4, FUSED=False, QUANT_IN=True),
    ("fp8", 4, 6144, 4096): dict(_D, BLOCK_N=64, BLOCK_K=128, SPLITS=4, FUSED=True, QUANT_IN=False, num_stages=4),
    ("fp8", 4, 4096, 4096): dict(_D, BLOCK_N=32, BLOCK_K=128, SPLITS=4, FUSED=True, QUANT_IN=False, num_stages=4),
    ("fp8", 4, 28672, 4096): dict(_D, BLOCK_N=32, BLOCK_K=128, SPLITS=1, FUSED=False, QUANT_IN=False, num_stages=4),
    ("fp8", 4, 4096, 14336): dict(_D, BLOCK_N=32, BLOCK_K=256, SPLITS=4, FUSED=True, QUANT_IN=False, num_stages=4),
    ("fp8", 16, 6144, 4096): dict(_D, BLOCK_N=64, BLOCK_K=128, SPLITS=4, FUSED=False, QUANT_IN=False, num_stages=4),
    ("fp8", 16, 4096, 4096): dict(_D, BLOCK_N=32, BLOCK_K=128, SPLITS=4, FUSED=True, QUANT_IN=False, num_stages=4),
    ("fp8", 16, 28672, 4096): dict(_D, BLOCK_N=32, BLOCK_K=128, SPLITS=1, FUSED=False, QUANT_IN=False, num_stages=4),
    ("fp8", 16, 4096, 14336): dict(_D, BLOCK_N=32, BLOCK_K=256, SPLITS=4, FUSED=True, QUANT_IN=False, num_stages=4),
}}
# (weights, row bucket) -> the form for other shapes; PER_SM: programs per SM (-> split count).
# From the same run: the one config that was within ~10% of the best on all eight M=1 shapes
# (gemv, 16 x 512, splits for >= 2 programs an SM), and at 2-16 rows the tensor-core form
# whose split counts at 2 programs an SM were the winners' on all four 8B shapes.
SKINNY_RULE: dict = {
    ("fp8", 1): dict(_G, BLOCK_N=16, BLOCK_K=512, FUSED=False, QUANT_IN=True, PER_SM=2),
    ("fp8", 4): dict(_D, BLOCK_N=32, BLOCK_K=128, FUSED=True, QUANT_IN=False, num_stages=4, PER_SM=2),
    ("fp8", 16): dict(_D, BLOCK_N=32, BLOCK_K=128, FUSED=True, QUANT_IN=False, num_stages=4, PER_SM=2),
}


SKINNY_FILE_ENV = "HALSERVE_SKINNY_CONFIGS"
_SKINNY_KEYS = {"KIND", "BLOCK_N", "BLOCK_K", "SPLITS", "FUSED", "QUANT_IN", "num_warps", "num_stages"}


@functools.lru_cache(maxsize=None)
def _skinny_file(path: str) -> dict:
    """Configs a sweep wrote (``bench/skinny_gemm.py --emit-table``), read before the table:
    a device run times the engine end to end on what its own sweep found. Format:
    ``{"arch": "sm90", "entries": [{"weights": "fp8", "rows": 1, "N": .., "K": .., "cfg": {..}}]}``."""
    import json

    try:
        with open(path) as f:
            doc = json.load(f)
        out = {}
        for e in doc["entries"]:
            cfg = dict(e["cfg"])
            if not _SKINNY_KEYS <= set(cfg) <= _SKINNY_KEYS | {"PDL"} or cfg["KIND"] not in ("dot", "gemv", "gemvr"):
                raise ValueError(f"config keys {sorted(cfg)} / KIND {cfg.get('KIND')!r}")
            ints = ("BLOCK_N", "BLOCK_K", "SPLITS", "num_warps", "num_stages")
            if not all(isinstance(cfg[key], int) and cfg[key] >= 1 for key in ints):
                raise ValueError(f"{', '.join(ints)} must be positive integers, got {[cfg[key] for key in ints]}")
            if int(e["rows"]) not in (1, 4, 16) or e["weights"] not in ("fp8", "bf16"):
                raise ValueError(f"rows {e['rows']!r} / weights {e['weights']!r} (rows: 1, 4 or 16; "
                                 "weights: fp8 or bf16)")
            out[(doc["arch"], e["weights"], int(e["rows"]), int(e["N"]), int(e["K"]))] = cfg
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{SKINNY_FILE_ENV}={path}: not a skinny config file ({type(e).__name__}: {e}); "
                         f"valid: the JSON that bench/skinny_gemm.py --emit-table writes") from None


def _skinny_tuned(wt: str, m: int, n: int, k: int) -> "dict | None":
    key = (wt, _rows_bucket(m), n, k)
    path = os.environ.get(SKINNY_FILE_ENV)
    if path:
        table = _skinny_file(path)
        archs = sorted({k[0] for k in table})
        if table and arch() not in archs:  # a file for another card would be ignored without a word
            raise ValueError(f"{SKINNY_FILE_ENV}={path}: its configs are for {', '.join(archs)}, this device is "
                             f"{arch()}; unset it or sweep this card (bench/skinny_gemm.py --emit-table)")
        hit = table.get((arch(),) + key)
        if hit is not None:
            return dict(hit)
    hit = SKINNY_TUNED.get(arch(), {}).get(key)
    return dict(hit) if hit is not None else None


def _rows_bucket(m: int) -> int:
    return 1 if m <= 1 else 4 if m <= 4 else 16


def _skinny_splits(n: int, k: int, bn: int, bk: int, per_sm: int) -> int:
    """Split count from the weight's shape: about ``per_sm`` programs per SM, each split at
    least one BLOCK_K step."""
    tiles, splits, want = (n + bn - 1) // bn, 1, per_sm * num_sms()
    while tiles * splits < want and k // (splits * 2) >= bk:
        splits *= 2
    return splits


def skinny_config(m: int, n: int, k: int, w_bytes: int) -> dict:
    """Launch config of the weight-streaming GEMM. Tiles and split count depend on the weight's
    shape (the row count picks only a bucket of the sweep's table): enough programs to keep
    every SM streaming. ``KIND``: 'gemv' (CUDA-core FMAs) or 'dot' (tensor cores);
    ``FUSED``: the last program of a tile adds the split partials (no second kernel);
    ``QUANT_IN``: W8A8 activations are quantized inside the kernel (no first kernel)."""
    fam = _family(arch())
    if fam == "interp":
        bk = 32
        return dict(KIND="gemv" if m <= 4 else "dot", BLOCK_N=16, BLOCK_K=bk, SPLITS=2 if k > 2 * bk else 1,
                    FUSED=True, QUANT_IN=True, num_warps=1, num_stages=1)
    wt = "fp8" if w_bytes == 1 else "bf16"
    hit = _skinny_tuned(wt, m, n, k)
    if hit is not None:
        return hit
    rule = SKINNY_RULE.get((wt, _rows_bucket(m))) if fam == "hopper+" else None
    if rule is not None:
        cfg = {key: v for key, v in rule.items() if key != "PER_SM"}
        cfg["SPLITS"] = _skinny_splits(n, k, cfg["BLOCK_N"], cfg["BLOCK_K"], rule["PER_SM"])
        return cfg
    bk = 256 if w_bytes == 1 else 128
    bn = 64
    splits = _skinny_splits(n, k, bn, 4 * bk, 4)
    return dict(KIND="dot", BLOCK_N=bn, BLOCK_K=bk, SPLITS=splits, FUSED=False, QUANT_IN=False, num_warps=4,
                num_stages=4)


def skinny_bf16_config(m: int, n: int, k: int) -> "dict | None":
    """The weight-streaming config for a 16-bit linear of ``m`` rows, or None where cuBLAS is
    the faster (the sweep's "bf16" entries). Under the interpreter: rows <= 4 stream (so the
    conformance suite runs this path)."""
    fam = _family(arch())
    if fam == "interp":
        return skinny_config(m, n, k, 2) if m <= 4 else None
    return _skinny_tuned("bf16", m, n, k)


# ---- fused MoE ---------------------------------------------------------------------------------
def moe_config(m_tokens: int, fixed: bool = False) -> dict:
    fam = _family(arch())
    if fam == "interp":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
    if fam in ("cdna3", "cdna4"):
        hip = dict(waves_per_eu=0, matrix_instr_nonkdim=16, kpack=2 if fam == "cdna3" else 1)
        if fixed or m_tokens > 256:
            return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=2, **hip)
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2, **hip)
    if fixed or m_tokens > 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
