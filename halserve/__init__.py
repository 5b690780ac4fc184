"""halserve: a portable LLM inference and serving engine.

Public API: ``LLM``, ``AsyncLLM``, ``SamplingParams``, ``__version__``. Imports are lazy so
``halserve --help`` and ``halserve probe`` start fast.
"""
from __future__ import annotations

import os

# Spinning OpenMP barriers starve other threads (the server's event loop, the engine thread)
# and collapse throughput on shared or small CPUs; only effective if torch is not loaded yet.
# With 8 or more CPUs, a short spin first (2000 PAUSE loops, ~0.05-0.2 ms): a decode step's
# GEMVs come tens of microseconds apart, and waking 15 sleeping workers for each cost the
# 16-core AMX host 18 of a 48 ms step. Never on small shared machines: on a loaded 2-vCPU box
# the same 2000 spins made a GEMV 8 ms instead of 1 (a preempted spinner holds the barrier for
# a scheduler tick; docs/performance.md). Only under our own policy: GOMP_SPINCOUNT overrides
# OMP_WAIT_POLICY, so a user's setting wins; `halserve serve` drops the spin (its event loop
# shares the cores).
_SPIN_DEFAULTED = False
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if (os.cpu_count() or 1) >= 8 and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "2000"
        _SPIN_DEFAULTED = True
# torch's oneDNN JIT-builds one GEMM primitive per (M, N, K), ~0.65 MB each, and keeps it in two
# LRU caches (oneDNN's, and ideep's in front of it, which holds the primitive even when oneDNN's
# drops it), 1,024 each: a server that sees many batch and prefill sizes keeps ~650 MB of them.
# 512 caps that near 330 MB and still holds every decode batch size of the default
# max_num_seqs; a miss costs a ~0.5 ms rebuild (docs/reliability.md). Both are read at the
# first GEMM, so setting them here is in time even when torch is already imported.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
os.environ.setdefault("LRU_CACHE_CAPACITY", "512")

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in ("LLM", "AsyncLLM"):
        from halserve.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from halserve.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'halserve' has no attribute {name!r}")
