"""cpu_amx weight formats beyond the shared ones (``halserve.hal.quant``): int4 group-wise
weight-only, and helpers that name a PackedWeight's scheme and dequantize any of them.

int4 layout (what ``pack_int4`` makes, ``hs_linear_i4`` reads): row n holds K/2 bytes; in each run of 32 values
byte j carries value j in its low nibble and value j + 16 in its high nibble, stored as
q + 8 (q in [-8, 7]); one float32 scale per group (amax / 7, symmetric). 2-D weights are then
re-laid by ``interleave_int4`` for the decode GEMV (linear_q.c); stacked experts keep this one."""
from __future__ import annotations

import mmap
import threading

import torch

from halserve.hal.interface import PackedWeight
from halserve.hal.quant import dequant

INT4_SCHEMES = {"int4": 128, "int4_g32": 32, "int4_g64": 64, "int4_g128": 128}
NATIVE_ONLY = ("fp8", "fp8_per_tensor", "fp8_weight_only")


def pack_int4(weight: torch.Tensor, group: int) -> PackedWeight:
    """[..., N, K] (2-D linear or 3-D stacked experts) -> packed bytes [..., N, K/2] and
    scales [..., N, K/group]."""
    lead, n, k = weight.shape[:-2], weight.shape[-2], weight.shape[-1]
    if k % group:
        raise ValueError(f"int4 group size {group} must divide in_features {k}; use an int4_g32/g64/g128 "
                         f"whose group divides it, or int8")
    wf = weight.float().reshape(*lead, n, k // group, group)
    scale = wf.abs().amax(dim=-1).clamp(min=1e-12) / 7.0
    q = torch.round(wf / scale[..., None]).clamp(-8, 7).to(torch.int16) + 8
    q = q.reshape(*lead, n, k // 32, 2, 16)
    packed = (q[..., 0, :] | (q[..., 1, :] << 4)).to(torch.uint8).reshape(*lead, n, k // 2).contiguous()
    return PackedWeight(packed, "int4", scale.contiguous(), "none", n, k, {"group": group})


HUGE_PAGE = 2 << 20
# Quantized weights go on transparent huge pages (on_huge_pages). A decode GEMV streams every
# weight byte once; with 4 KiB pages every 64 cache lines cost a TLB miss and a page
# walk in the middle of the stream (the STLB covers a few MB). This 2-vCPU box, same
# process, int8 gate_up 11264 x 2048 at M = 1, one thread: 11.1 -> 15.0 GB/s (p20 of the calls),
# int4 9.2 -> 11.0, int8 qkv on two threads 24.4 -> 27.5 (2026-12-05, /tmp THP "madvise").
# False keeps torch's own allocation (A/B timing).
HUGE_PAGES = True


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in fresh anonymous memory whose 2 MiB-aligned part is advised
    MADV_HUGEPAGE (Linux THP in "always" or "madvise" mode then backs it with 2 MiB pages as
    the copy first touches it). ``t`` itself where that cannot help or is not offered: under
    one huge page, HUGE_PAGES off, no MADV_HUGEPAGE (not Linux). The memory lives as long as
    the returned tensor (it holds the mapping)."""
    n = t.numel() * t.element_size()
    if not HUGE_PAGES or n < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    # private (a shared anonymous mapping is shmem, whose THP setting is another, usually
    # "never") and untouched: the advice applies at the first fault
    try:
        m = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    except (OSError, ValueError):  # no mapping to be had (address-space limit, ...): torch's memory
        return t
    raw = torch.frombuffer(m, dtype=torch.uint8)
    off = -raw.data_ptr() % HUGE_PAGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, off, (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE)
    except OSError:  # a kernel without THP: plain pages, still a valid copy
        pass
    out = raw[off:off + n].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


# 2-D int4 weights are re-laid for the decode GEMV (linear_q.c): 16 rows a block, each 64-byte
# chunk 16 rows x 8 columns (see interleave_int4). False keeps the row-major layout (A/B timing).
INT4_INTERLEAVE = True


def interleave_int4(pw: PackedWeight) -> PackedWeight:
    """A row-major int4 PackedWeight [N, K/2] -> the x16 layout linear_q.c streams: weight
    [ceil(N/16), K/8, 64] uint8 (rows past N hold q = 0), scale [ceil(N/16), K/group, 16]
    (0 past N). In a block's chunk c, little-endian word 2i + e holds row i's column
    8c + 2j + e in nibble j (as q + 8). The values are pw's, bit for bit."""
    n, k, group = pw.out_features, pw.in_features, pw.extra["group"]
    if k % 8:
        raise ValueError(f"int4 in_features {k} must be a multiple of 8")
    nb = -(-n // 16)
    b = pw.weight.reshape(n, k // 32, 16).to(torch.int16)
    q = torch.stack([b & 15, b >> 4], dim=2).reshape(n, k)  # stored values q + 8, row-major
    q = torch.cat([q, q.new_full((nb * 16 - n, k), 8)]) if nb * 16 > n else q
    q = q.reshape(nb, 16, k // 8, 4, 2).permute(0, 2, 1, 4, 3)  # [block, chunk, row, e, j]
    lo = (q[..., 0] | (q[..., 1] << 4)).to(torch.uint8)  # byte 0 of each little-endian word
    hi = (q[..., 2] | (q[..., 3] << 4)).to(torch.uint8)
    packed = on_huge_pages(torch.stack([lo, hi], dim=-1).reshape(nb, k // 8, 64).contiguous())  # [nb, C, 16, 2, 2]
    sc = pw.scale.float()
    sc = torch.cat([sc, sc.new_zeros(nb * 16 - n, sc.shape[1])]) if nb * 16 > n else sc
    scale = sc.reshape(nb, 16, k // group).permute(0, 2, 1).contiguous()
    return PackedWeight(packed, "int4", scale, "none", n, k, {"group": group, "layout": "x16"})


def _rowmajor_q(w: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in [-8, 7] as int16 [N, K], scales [N, K/group]) of either int4 layout."""
    n, k, group = w.out_features, w.in_features, w.extra["group"]
    if w.extra.get("layout") == "x16":
        nb = w.weight.shape[0]
        by = w.weight.reshape(nb, k // 8, 16, 2, 2).to(torch.int32)
        words = by[..., 0] | (by[..., 1] << 8)  # [nb, C, 16, e]
        q = torch.stack([(words >> (4 * j)) & 15 for j in range(4)], dim=-1)  # [nb, C, 16, e, j]
        q = q.permute(0, 2, 1, 4, 3).reshape(nb * 16, k)[:n].to(torch.int16) - 8
        scale = w.scale.permute(0, 2, 1).reshape(nb * 16, k // group)[:n]
        return q, scale
    b = w.weight.reshape(n, k // 32, 16).to(torch.int16)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(n, k) - 8, w.scale


def unpack_int4(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k, group = w.out_features, w.in_features, w.extra["group"]
    q, scale = _rowmajor_q(w)
    return (q.float().reshape(n, k // group, group) * scale[..., None]).reshape(n, k).to(dtype)


def scheme_name(w: PackedWeight) -> str:
    """The pack_weight scheme a PackedWeight came from."""
    if w.scheme == "int4":
        g = w.extra["group"]
        return "int4" if g == 128 else f"int4_g{g}"
    if w.scheme == "int8" and w.act_scheme != "none":
        return "int8_w8a8"
    if w.scheme == "fp8":
        return {"none": "fp8_weight_only", "per_tensor": "fp8_per_tensor"}.get(w.act_scheme, "fp8")
    return w.scheme


def dequant_any(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] in ``dtype``, made per call (a cached copy would undo the quantization's memory
    saving); only large-M calls come here, where the GEMM dwarfs this pass."""
    return unpack_int4(w, dtype) if w.scheme == "int4" else dequant(w, dtype)


def expert(w: PackedWeight, e: int) -> PackedWeight:
    """Expert e of a stacked [E, N, K] weight as a 2-D PackedWeight (views, no copies)."""
    n, k = w.weight.shape[-2], w.in_features
    if w.scheme == "int4":
        return PackedWeight(w.weight[e], "int4", w.scale[e], "none", n, k, {"group": w.extra["group"]})
    scale = None
    if w.scale is not None:
        scale = w.scale[e] if w.scale.dim() == 2 else w.scale.reshape(-1)[:1].expand(n).contiguous()
    return PackedWeight(w.weight[e], w.scheme, scale, w.act_scheme, n, k)


TILE_BYTES = 64 << 20  # dequantized rows per GEMM call: fewer, bigger calls measured faster (16 MB tiles: 1.4x slower)
_scratch = threading.local()  # one tile buffer per thread, kept: a fresh one per call page-faults every time


def _tile(nbytes: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _scratch.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf


def linear_tiled(lib, x: torch.Tensor, w: PackedWeight, kind: int, wp: int, sp: int, group: int,
                 bias: "torch.Tensor | None") -> torch.Tensor:
    """Weight-only int8 (kind 2) / int4 (kind 3) linear at large M: blocks of rows are
    dequantized by ``hs_dequant_rows`` into a kept buffer in ``x``'s dtype and each block runs
    through torch's GEMM (oneDNN: AMX tiles for bf16). The values are exactly
    ``dequant_any(w, x.dtype)``'s; no whole dequantized weight is ever made."""
    import torch.nn.functional as F

    m, k = x.shape
    n = w.out_features
    es = x.element_size()
    rows = min(n, max(64, TILE_BYTES // (k * es) // 64 * 64))
    buf = _tile(rows * k * es)[:rows * k * es].view(x.dtype).view(rows, k)
    bf16 = int(x.dtype == torch.bfloat16)
    if rows == n:
        lib.hs_dequant_rows(wp, kind, sp, group, k, 0, n, buf.data_ptr(), bf16)
        return F.linear(x, buf, bias)
    y = torch.empty(m, n, dtype=x.dtype)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        lib.hs_dequant_rows(wp, kind, sp, group, k, n0, n1, buf.data_ptr(), bf16)
        y[:, n0:n1] = F.linear(x, buf[:n1 - n0], None if bias is None else bias[n0:n1])
    return y
