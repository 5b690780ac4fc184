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

/* 1: attention with few rows (a decode step's) still splits over the pool;
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

/* x as fp32: x itself, or a per-thread copy converted from bf16 (linear.c; grown, never shrunk) */
const float *hs_x_as_f32(const void *x, int x_bf16, int64_t n);

#ifdef __AVX512F__
#include <immintrin.h>
/* 16 bfloat16 -> 16 float (a 16-bit shift) */
static inline __m512 hs_bf16x16_load(const bf16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 float -> 16 bfloat16 bit patterns, rounded as f32_to_bf16 does (nearest even, NaN stays quiet) */
static inline __m256i hs_bf16x16_round(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rne = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    __mmask16 isnan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                              _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(isnan, rne, nan));
}

static inline void hs_bf16x16_store(bf16_t *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, hs_bf16x16_round(v)); }

/* exp(x) for 16 lanes, ~2 ulp: 2^k * 2^f with k = round(x log2 e), 2^f by Cephes' exp2f
 * polynomial on [-0.5, 0.5], 2^k by VSCALEFPS (libm's expf is scalar: a decode's
 * silu_and_mul would spend ~25 us of 5632 calls in it) */
static inline __m512 hs_exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, k);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.535336188319500e-4f), f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, k);
}
#endif

static inline void row_from_f32(void *p, int64_t off, int n, int bf16, const float *src) {
    if (bf16) {
        bf16_t *d = (bf16_t *)p + off;
#pragma omp simd
        for (int i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)p + off, src, (size_t)n * 4);
    }
}

#ifdef __AMX_TILE__
#include <immintrin.h>
/* The AMX kernels' tile set-up: tiles 0..n-1 of 16 rows x 64 bytes (palette 1), for this thread. */
static inline void amx_config_tiles(int n) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < n; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
}

/* accumulator tile U (0..3; tile numbers are immediates) stored as 16 rows of 64 bytes at DST */
#define AMX_STORE_ACC(U, DST)                          \
    switch (U) {                                       \
    case 0: _tile_stored(0, DST, 64); break;           \
    case 1: _tile_stored(1, DST, 64); break;           \
    case 2: _tile_stored(2, DST, 64); break;           \
    default: _tile_stored(3, DST, 64); break;          \
    }
#endif
#endif
