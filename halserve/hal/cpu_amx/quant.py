"""cpu_amx weight formats beyond the shared ones (``halserve.hal.quant``): int4 group-wise
weight-only, and helpers that name a PackedWeight's scheme and dequantize any of them.

int4 layout (what ``hs_linear_i4`` reads): row n holds K/2 bytes; in each run of 32 values
byte j carries value j in its low nibble and value j + 16 in its high nibble, stored as
q + 8 (q in [-8, 7]); one float32 scale per group (amax / 7, symmetric)."""
from __future__ import annotations

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


def unpack_int4(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k, group = w.out_features, w.in_features, w.extra["group"]
    b = w.weight.reshape(n, k // 32, 16).to(torch.int16)
    q = torch.stack([b & 15, b >> 4], dim=2).reshape(n, k) - 8
    return (q.float().reshape(n, k // group, group) * w.scale[..., None]).reshape(n, k).to(dtype)


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
