"""EngineConfig: one dataclass, filled from CLI flags or ``LLM(**kwargs)``."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A bad user-supplied setting; the message names the value and what is valid."""


# int8_w8a8: per-channel int8 weights x per-token dynamic int8 activations;
# int4*: group-wise weight-only (group 128 by default); fp8*: e4m3. Backends say which they run.
QUANTIZATIONS = ("fp8", "int8", "int8_w8a8", "int4", "int4_g32", "int4_g64", "int4_g128")


@dataclass(slots=True)
class EngineConfig:
    model: str = ""
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    backend: str | None = None  # None: highest probe score; else e.g. "native", "cuda:1"
    seed: int = 0
    kv_cache_memory: int | None = None  # bytes for the KV cache (CPU default: 1 GiB)
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    quantization: str | None = None  # None | one of QUANTIZATIONS
    # the output projection (lm_head) in the same scheme (llama.cpp's Q8_0/Q4_0 files quantize it
    # too; vLLM keeps it unquantized unless a checkpoint says otherwise): needs a quantization
    quantize_lm_head: bool = False
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    batch_invariant: bool = False
    served_model_name: str | None = None
    # KV offload tiers (engine/offload.py)
    kv_offload_host_bytes: int = 0
    kv_offload_dir: str | None = None
    kv_offload_disk_bytes: int = 16 << 30
    # speculative decoding (engine/spec/): vLLM's dict, validated in __post_init__
    speculative_config: dict | None = field(default=None)
    # vLLM's name: schedule and build step n+1 while step n runs on the device. None: on where
    # the backend's device runs apart from the host and nothing needs a synchronous step
    # (speculative decoding, KV offload); True: required (refused where not possible)
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"):
            raise ConfigError(f"dtype={self.dtype!r} is not valid; use auto, float32, bfloat16 or float16")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len={self.max_model_len} must be a positive integer")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory={self.kv_cache_memory} must be a positive number of bytes")
        if self.kv_offload_host_bytes < 0:
            raise ConfigError(f"kv_offload_host_bytes={self.kv_offload_host_bytes} must be >= 0 (0: no host tier)")
        if self.kv_offload_disk_bytes <= 0:
            raise ConfigError(f"kv_offload_disk_bytes={self.kv_offload_disk_bytes} must be a positive number of bytes")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization={self.quantization!r} is not valid; use {', '.join(QUANTIZATIONS)}")
        if self.quantize_lm_head not in (True, False):
            raise ConfigError(f"quantize_lm_head={self.quantize_lm_head!r} must be true or false")
        if self.quantize_lm_head and self.quantization is None:
            raise ConfigError("quantize_lm_head=True needs a quantization (it puts the lm_head in that scheme); "
                              "set quantization too, or leave quantize_lm_head off")
        if self.speculative_config is not None:
            from halserve.engine.spec.config import parse_speculative_config

            try:  # checked here so that a bad one fails before any model is loaded
                parse_speculative_config(self.speculative_config)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.async_scheduling not in (None, True, False):
            raise ConfigError(f"async_scheduling={self.async_scheduling!r} must be true, false or unset (auto)")
        if self.async_scheduling and self.speculative_config is not None:
            raise ConfigError("async_scheduling=True is not supported with speculative_config (speculative "
                              "decoding runs synchronously); leave async_scheduling unset or set it false")
        self._check_kv_cache_dtype()

    def _check_kv_cache_dtype(self) -> None:
        # vLLM's values: auto (the model dtype), the model dtype by name, or an fp8 (e4m3)
        # cache with per-layer scales (hal/kv_fp8.py); anything else is refused by name.
        from halserve.hal.kv_fp8 import FP8_NAMES, MODEL_DTYPE_NAMES, REFUSED

        kv = self.kv_cache_dtype
        if kv == "auto" or kv in FP8_NAMES:
            return
        valid = f"use auto, {', '.join(FP8_NAMES)}, or the model's dtype given with --dtype"
        if kv in REFUSED:
            raise ConfigError(f"kv_cache_dtype={kv!r} is not valid: {REFUSED[kv]}; {valid}")
        if kv not in MODEL_DTYPE_NAMES:
            raise ConfigError(f"kv_cache_dtype={kv!r} is not valid; {valid} (float32, bfloat16, float16)")
        if MODEL_DTYPE_NAMES.get(self.dtype) != MODEL_DTYPE_NAMES[kv]:
            raise ConfigError(f"kv_cache_dtype={kv!r} is not valid with dtype={self.dtype!r}: a non-fp8 KV "
                              f"cache is kept in the model dtype; use auto or fp8, or set "
                              f"dtype={MODEL_DTYPE_NAMES[kv]!r} as well")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown engine argument(s): {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(names))}")
        return cls(**kwargs)
