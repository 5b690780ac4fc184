/* Shared helpers for the cpu_amx kernels. Every kernel file is compiled once per ISA tier
 * (-mavx2 -mfma | -mavx512* | + -mamx-*); loops are written so GCC vectorizes them for
 * the tier's vector width, and reductions run in one fixed order per build (batch
 * invariance: a row's sums never depend on how many rows came with it). */
#ifndef HALSERVE_CPU_AMX_COMMON_H
#define HALSERVE_CPU_AMX_COMMON_H
#include <stdint.h>
#include <string.h>
#include <math.h>

typedef uint16_t bf16_t;

/* 1: ops with few rows (a decode step's silu_and_mul, attention) still split over the pool;
 * 0: they run on the calling thread. With sleeping workers (OMP_WAIT_POLICY=PASSIVE) a
 * parallel region pays for waking them, which can cost more than such an op's work. */
extern int hs_small_par;

typedef union { uint32_t u; float f; } hs_bits;

static inline float bf16_to_f32(bf16_t h) {
    hs_bits b;
    b.u = (uint32_t)h << 16;
    return b.f;
}

/* round to nearest even, as torch's float -> bfloat16 conversion does (NaN stays a quiet
 * NaN). Written as a select, not a branch, so loops over rows vectorize. */
static inline bf16_t f32_to_bf16(float f) {
    hs_bits b;
    b.f = f;
    uint32_t u = b.u;
    uint32_t nan = (u >> 16) | 0x40u, rne = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (bf16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rne);
}

/* dtype codes shared with Python: 0 float32, 1 bfloat16 */
static inline float load_f(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const bf16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_f(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((bf16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

static inline void row_to_f32(const void *p, int64_t off, int n, int bf16, float *dst) {
    if (bf16) {
        const bf16_t *s = (const bf16_t *)p + off;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)p + off, (size_t)n * 4);
    }
}

static inline void row_from_f32(void *p, int64_t off, int n, int bf16, const float *src) {
    if (bf16) {
        bf16_t *d = (bf16_t *)p + off;
#pragma omp simd
        for (int i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)p + off, src, (size_t)n * 4);
    }
}
#endif
