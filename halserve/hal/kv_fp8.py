"""The fp8 (e4m3) KV cache: its names, its storage rule and the inverse, shared by every
backend, the conformance harness and the engine, so they all agree on what a cached byte means.

vLLM's semantics: one float32 ``k_scale`` and one ``v_scale`` per layer; the cache stores
``fp8(clamp(x * (1 / scale), +-448))`` (round to nearest even, saturating) and attention reads
``stored * scale``. ``1 / scale`` is rounded to float32 once (``inv_scale``), so a kernel that
multiplies by the float32 it is given stores the very bytes the torch rule stores.
"""
from __future__ import annotations

import functools
import struct

import torch

from halserve.hal.quant import FP8_DTYPE, FP8_MAX

# --kv-cache-dtype values: "auto" keeps the model dtype; a model dtype name must match --dtype
MODEL_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
                     "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}
FP8_NAMES = ("fp8", "fp8_e4m3")
REFUSED = {"fp8_e5m2": "fp8_e5m2 is not implemented (only e4m3: fp8, fp8_e4m3)",
           "fp8_inc": "fp8_inc (Intel Gaudi) is not implemented (only e4m3: fp8, fp8_e4m3)",
           "fp8_ds_mla": "fp8_ds_mla is not implemented (only e4m3: fp8, fp8_e4m3)"}


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the KV cache is allocated in for a validated ``kv_cache_dtype``."""
    if kv_cache_dtype in FP8_NAMES:
        if FP8_DTYPE is None:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs torch.float8_e4m3fn "
                             f"(torch >= 2.1); this torch is {torch.__version__}")
        return FP8_DTYPE
    return model_dtype


def is_fp8(dtype) -> bool:
    return FP8_DTYPE is not None and (dtype is FP8_DTYPE or str(dtype).removeprefix("torch.") == "float8_e4m3fn")


@functools.lru_cache(maxsize=1024)
def inv_scale(scale: float) -> float:
    """1 / scale rounded to float32: the multiplier every writer uses."""
    return struct.unpack("f", struct.pack("f", 1.0 / float(scale)))[0]  # no tensor: nothing for a graph capture to see


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x (any float dtype) -> float8_e4m3fn values of x / scale, saturated to +-448."""
    return (x.float() * inv_scale(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cached values -> ``dtype``: fp8 bytes times ``scale``; any other cache as it is."""
    if not is_fp8(x.dtype):
        return x.to(dtype)
    return (x.float() * float(scale)).to(dtype)
