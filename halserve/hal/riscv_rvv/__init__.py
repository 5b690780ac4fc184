"""riscv_rvv: C kernels (RVV 1.0 intrinsics, or portable scalar C) called through cffi."""
from halserve.hal.riscv_rvv.backend import RvvBackend

__all__ = ["RvvBackend"]
