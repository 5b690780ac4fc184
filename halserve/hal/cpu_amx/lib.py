"""Build and load the cpu_amx C kernels for one ISA tier (through ``halserve.hal.cbuild``).

Each tier is the same C sources compiled with that tier's ``-m`` flags into its own cached
library; the backend picks the best tier the CPU (and the kernel, for AMX) allows."""
from __future__ import annotations

import os
from pathlib import Path

from halserve.hal.cbuild import CBuildError, load_library

HERE = Path(__file__).parent
SOURCES = [HERE / n for n in ("linear.c", "linear_q.c", "ops.c", "attention.c", "moe.c", "gemm_dequant.c", "runtime.c",
                              "sample.c", "gemm_amx.c")]

TIERS = ("amx", "avx512", "avx2")
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
FLAGS = {
    "avx2": _AVX2,
    "avx512": _AVX512,
    "amx": [*_AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
}
# CPU flags (from /proc/cpuinfo) each tier's build may execute
NEEDS = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c"),
    "amx": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
            "amx_tile", "amx_bf16", "amx_int8"),
}

# Pointers cross as uintptr_t (torch's data_ptr() ints, no ffi.cast per argument: a decode
# token makes ~100 such calls with ~5 pointers each). x86-64 and riscv64 pass both in the
# same integer registers, so the C side keeps its typed pointers.
CDEF = """
typedef uintptr_t P;
int hs_linear(P x, int x_bf16, int M, int K, P w, int kind, P scale, int group, int N, P bias, P y, int y_bf16, P xs,
              P wsum);
void hs_set_prefetch(int bytes);
void hs_set_qkernels(int v);
int hs_get_qkernels(void);
void hs_set_qprefetch(int bytes);
void hs_set_small_parallel(int on);
void hs_rms_norm(P x, P res, P w, int w_bf16, P y, P h_out, int T, int H, float eps, int bf16);
int hs_rotary(P pos, P q, P k, P cos_sin, int T, int Hq, int Hk, int D, int rot, int is_neox, int bf16, int64_t npos);
void hs_silu_and_mul(P x, P y, int T, int I, int bf16);
int hs_write_kv(P key, P value, P kcache, P vcache, P slots, int T, int64_t row, int64_t nslots);
int hs_rotary_write_kv(P pos, P q, P k, P v, P cos_sin, P kcache, P vcache, P slots, int T, int Hq, int Hk, int D,
                       int rot, int is_neox, int bf16, P qw, P kw, int w_bf16, float eps, int64_t npos,
                       int64_t nslots);
int hs_attention(P q, P kc, P vc, P out, P cu_q, P seq_lens, P tables, int max_blocks, int num_seqs, int T, int Hq,
                  int Hk, int D, int bs, int window, float scale, int qbf16, int max_seqlen_k, int bf16,
                  int prefill_spans, int num_blocks);
void hs_dequant_rows(P w, int kind, P scale, int group, int K, int n0, int n1, P dst, int bf16);
int hs_moe(P x, int x_bf16, int T, int H, int I, int E, int topk, P ids, P tw, P w13, P s13, P ws13, P w2, P s2,
           P ws2, int kind, P out);
int hs_sample(P logits, int lbf16, int64_t B, int64_t V, P temp, P top_k, P top_p, P min_p, P seeds, P steps,
               int flags, P out);
int hs_amx_request(void);
void hs_set_threads(int n);
int hs_gemm_amx(P x, int x_bf16, int M, int K, P w, int N, P bias, P y, int y_bf16);
void hs_set_amx_prefetch(int bytes, int flags);
void hs_set_amx_rows(int rows);
void hs_set_attn_amx(int on);
void hs_set_attn_prefill_spans(int on);
void hs_set_amx_sched(int dynamic);
int hs_get_threads(void);
int hs_tier(void);
"""


def _share_torch_openmp() -> None:
    """Make our OpenMP calls bind to the runtime torch already loaded, so the two share one
    thread pool (no second set of workers spinning beside torch's). torch's wheels ship
    their own libgomp (sometimes under a hashed name): exported globally before our
    library loads, its symbols win over the system libgomp our library was linked to."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = {ln.split()[-1] for ln in f if "omp" in ln and ".so" in ln}
    except OSError:
        return
    for path in sorted(p for p in libs if "/libgomp" in p or "/libiomp" in p):
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0))
        except OSError:
            continue
        return


def load(tier: str):
    """(ffi, lib) for ``tier``; raises CBuildError with one line saying why not."""
    if tier not in FLAGS:
        raise CBuildError(f"cpu tier {tier!r} is not valid; use {', '.join(TIERS)}")
    import torch  # noqa: F401  (its OpenMP runtime must be loaded first)

    _share_torch_openmp()
    return load_library(f"cpu_amx_{tier}", SOURCES, CDEF,
                        ["-O3", "-fopenmp", "-fno-math-errno", *FLAGS[tier]], ["-fopenmp"])
