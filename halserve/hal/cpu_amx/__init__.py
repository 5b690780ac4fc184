"""cpu_amx: the x86-64 CPU backend (AMX, AVX-512 and AVX2 tiers of C kernels through cffi)."""
from halserve.hal.cpu_amx.backend import CpuAmxBackend

__all__ = ["CpuAmxBackend"]
