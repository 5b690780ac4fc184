"""Weight and activation quantization shared by every backend: the scheme names
``pack_weight`` takes, symmetric int8/fp8 quantization, and their inverses.

A backend that repacks weights (AMX tiles, RVV panels) starts from ``quantize``'s values
and scales, so every backend agrees on what a quantized weight means."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from halserve.hal.interface import PackedWeight

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0

# pack_weight scheme names -> (stored scheme, weight scale granularity, default act scheme)
WEIGHT_SCHEMES: dict[str, tuple[str, str, str]] = {
    "none": ("none", "", "none"),
    "int8": ("int8", "per_channel", "none"),  # weight-only: dequantize then GEMM
    "fp8": ("fp8", "per_channel", "per_token"),  # W8A8: per-channel weight x per-token act
    "fp8_per_tensor": ("fp8", "per_tensor", "per_tensor"),
    "fp8_weight_only": ("fp8", "per_channel", "none"),
}
ACT_SCHEMES = ("none", "per_tensor", "per_token")


def quantize(weight: torch.Tensor, qtype: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, float32 scale) for qtype 'int8' | 'fp8' and granularity 'per_tensor' (scale
    [1]) or 'per_channel' (scale [..., N], one per output row). Symmetric, amax-scaled."""
    wf = weight.float()
    qmax = INT8_MAX if qtype == "int8" else FP8_MAX
    if granularity == "per_tensor":
        amax = wf.abs().amax().reshape(1)
        scale = amax.clamp(min=1e-12) / qmax
        s = scale
    else:
        amax = wf.abs().amax(dim=-1)
        scale = amax.clamp(min=1e-12) / qmax
        s = scale[..., None]
    if qtype == "int8":
        q = torch.round(wf / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = (wf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.to(torch.float32)


def dequant(w: "PackedWeight", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as a plain [.., N, K] tensor of ``dtype``."""
    if w.scheme == "none":
        return w.weight.to(dtype)
    scale = w.scale.float()
    if scale.numel() > 1:
        scale = scale.reshape(*w.weight.shape[:-1], 1)
    return (w.weight.float() * scale).to(dtype)


def quant_act_fp8(x: torch.Tensor, act_scheme: str) -> torch.Tensor:
    """Simulate dynamic fp8 activation quantization: x -> fp8 -> float32 ('per_token' scales
    each row by its amax, otherwise one scale for the whole tensor)."""
    xf = x.float()
    if act_scheme == "per_token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        amax = xf.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.float() * scale
