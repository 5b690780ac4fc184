"""NVIDIA backend: Triton kernels from ``halserve.hal.triton`` plus torch (cuBLAS, cuBLASLt
FP8), CUDA graphs for decode, batch-invariant mode. Importing this never imports triton."""
from halserve.hal.cuda.backend import CudaBackend, CudaGraph

__all__ = ["CudaBackend", "CudaGraph"]
