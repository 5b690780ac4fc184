"""AMD Instinct backend: the shared Triton kernels (``halserve.hal.triton``) with CDNA3
(gfx942, MI300) and CDNA4 (gfx950, MI350) configs, and Gluon kernels written against AMD's
MFMA layouts (``gluon_attention``, ``gluon_fp8``). Importing this never imports triton."""
from halserve.hal.rocm.backend import RocmBackend

__all__ = ["RocmBackend"]
