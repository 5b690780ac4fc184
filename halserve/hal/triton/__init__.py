"""Triton kernels shared by the GPU backends (cuda today, rocm next).

Each module holds one kernel family and a small launcher that takes plain tensors and ints.
Modules import triton at their top, so import them lazily (inside the backend's methods):
``import halserve.hal.triton`` itself stays free of torch and triton.

- ``configs``: per-architecture launch configs (sm_80/89/90/100, gfx9, the interpreter).
- ``elementwise``: rms_norm (+residual), rotary, silu_and_mul, write_kv.
- ``attention``: paged varlen attention (prefill with cached prefix and decode in one
  kernel, GQA heads packed, optional split-KV with a merge kernel).
- ``matmul``: persistent fixed-tile matmul (batch-invariant mode) and the FP8 W8A8 GEMM.
- ``moe``: token/expert block alignment and the grouped GEMM of fused MoE (bf16 and fp8).
- ``sample``: Gumbel-max sampling with the native backend's counter-based hash.

Interpreter note: ``TRITON_INTERPRET=1`` computes bf16 wrongly, so kernels upcast to fp32
right after every load.
"""
