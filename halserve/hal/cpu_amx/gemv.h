/* Row-block dot kernels for GEMV-shaped work: GV_ROWS weight rows against NT (1..GV_TOK)
 * activation vectors. Each weight vector is loaded once and meets every activation (a
 * decode's tokens that share a weight read it once); four rows go together so each x load
 * feeds four independent accumulators. acc[t][r] = x_t . w_r, summed in an order fixed by
 * K and the build alone (never by NT or by which rows came together: batch invariant).
 * Row pointers for a short block repeat a valid row; the caller drops those results.
 * Written for moe.c; linear.c's single-token loops are the NT = 1 case of these. */
#ifndef HALSERVE_CPU_AMX_GEMV_H
#define HALSERVE_CPU_AMX_GEMV_H
#include "common.h"

#define GV_ROWS 4
#define GV_TOK 4
#define GV_PF 512 /* bytes ahead of each row's stream (linear.c's measured default) */
#define GV_INLINE static inline __attribute__((always_inline))

#ifdef __AVX512F__
#define GV_PREFETCH(p) _mm_prefetch((const char *)(p) + GV_PF, _MM_HINT_T0)

/* float32 x, float32 W */
GV_INLINE void gv_f32_nt(const float *const *x, int NT, const float *const *w, int K, float acc[GV_TOK][GV_ROWS]) {
    __m512 v[GV_TOK][GV_ROWS];
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) v[t][r] = _mm512_setzero_ps();
    int kv = K & ~15;
    for (int k = 0; k < kv; k += 16) {
        __m512 xv[GV_TOK];
        for (int t = 0; t < NT; t++) xv[t] = _mm512_loadu_ps(x[t] + k);
        for (int r = 0; r < GV_ROWS; r++) {
            GV_PREFETCH(w[r] + k);
            __m512 wv = _mm512_loadu_ps(w[r] + k);
            for (int t = 0; t < NT; t++) v[t][r] = _mm512_fmadd_ps(xv[t], wv, v[t][r]);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) {
            float a = _mm512_reduce_add_ps(v[t][r]);
            for (int k = kv; k < K; k++) a += x[t][k] * w[r][k];
            acc[t][r] = a;
        }
}

/* float32 x, bfloat16 W widened (a 16-bit shift): the AVX-512 tier's bf16 path */
GV_INLINE void gv_bf16w_nt(const float *const *x, int NT, const bf16_t *const *w, int K,
                           float acc[GV_TOK][GV_ROWS]) {
    __m512 v[GV_TOK][GV_ROWS];
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) v[t][r] = _mm512_setzero_ps();
    int kv = K & ~31;
    for (int k = 0; k < kv; k += 32) {
        for (int h = 0; h < 32; h += 16) {
            __m512 xv[GV_TOK];
            for (int t = 0; t < NT; t++) xv[t] = _mm512_loadu_ps(x[t] + k + h);
            for (int r = 0; r < GV_ROWS; r++) {
                if (!h) GV_PREFETCH(w[r] + k);
                __m512 wv = hs_bf16x16_load(w[r] + k + h);
                for (int t = 0; t < NT; t++) v[t][r] = _mm512_fmadd_ps(xv[t], wv, v[t][r]);
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) {
            float a = _mm512_reduce_add_ps(v[t][r]);
            for (int k = kv; k < K; k++) a += x[t][k] * bf16_to_f32(w[r][k]);
            acc[t][r] = a;
        }
}

/* float32 x, int8 W widened; the caller applies the row scale */
GV_INLINE void gv_i8w_nt(const float *const *x, int NT, const int8_t *const *w, int K, float acc[GV_TOK][GV_ROWS]) {
    __m512 v[GV_TOK][GV_ROWS];
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) v[t][r] = _mm512_setzero_ps();
    int kv = K & ~63;
    for (int k = 0; k < kv; k += 64) {
        for (int h = 0; h < 64; h += 16) {
            __m512 xv[GV_TOK];
            for (int t = 0; t < NT; t++) xv[t] = _mm512_loadu_ps(x[t] + k + h);
            for (int r = 0; r < GV_ROWS; r++) {
                if (!h) GV_PREFETCH(w[r] + k);
                __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w[r] + k + h))));
                for (int t = 0; t < NT; t++) v[t][r] = _mm512_fmadd_ps(xv[t], wv, v[t][r]);
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) {
            float a = _mm512_reduce_add_ps(v[t][r]);
            for (int k = kv; k < K; k++) a += x[t][k] * (float)w[r][k];
            acc[t][r] = a;
        }
}

#ifdef __AVX512BF16__
/* bfloat16 x, bfloat16 W with VDPBF16PS (two exact products per lane, fp32 sums) */
GV_INLINE void gv_bf16dot_nt(const bf16_t *const *x, int NT, const bf16_t *const *w, int K,
                             float acc[GV_TOK][GV_ROWS]) {
    __m512 v[GV_TOK][GV_ROWS];
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) v[t][r] = _mm512_setzero_ps();
    int kv = K & ~31;
    for (int k = 0; k < kv; k += 32) {
        __m512bh xv[GV_TOK];
        for (int t = 0; t < NT; t++) xv[t] = (__m512bh)_mm512_loadu_si512((const void *)(x[t] + k));
        for (int r = 0; r < GV_ROWS; r++) {
            GV_PREFETCH(w[r] + k);
            __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w[r] + k));
            for (int t = 0; t < NT; t++) v[t][r] = _mm512_dpbf16_ps(v[t][r], xv[t], wv);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) {
            float a = _mm512_reduce_add_ps(v[t][r]);
            for (int k = kv; k < K; k++) a += bf16_to_f32(x[t][k]) * bf16_to_f32(w[r][k]);
            acc[t][r] = a;
        }
}
#endif

#ifdef __AVX512VNNI__
/* int8 W against x in 16-bit fixed point split into bytes (linear.c's hs_linear_i8_x16
 * form): x[t] points at K low bytes (unsigned) followed by K high bytes (offset by 128), so
 * VPDPBUSD takes 64 products per instruction; wsum[r] (the row's sum over its first K & ~63
 * values) takes the 128 offset back off. acc = exact integer dot, to be scaled by the
 * caller's x scale and row scale. */
GV_INLINE void gv_i8x16_nt(const uint8_t *const *x, int NT, const int8_t *const *w, const int32_t *wsum, int K,
                           float acc[GV_TOK][GV_ROWS]) {
    __m512i al[GV_TOK][GV_ROWS], ah[GV_TOK][GV_ROWS];
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) al[t][r] = ah[t][r] = _mm512_setzero_si512();
    int kv = K & ~63;
    for (int k = 0; k < kv; k += 64) {
        __m512i xl[GV_TOK], xh[GV_TOK];
        for (int t = 0; t < NT; t++) {
            xl[t] = _mm512_loadu_si512((const void *)(x[t] + k));
            xh[t] = _mm512_loadu_si512((const void *)(x[t] + K + k));
        }
        for (int r = 0; r < GV_ROWS; r++) {
            GV_PREFETCH(w[r] + k);
            __m512i wv = _mm512_loadu_si512((const void *)(w[r] + k));
            for (int t = 0; t < NT; t++) {
                al[t][r] = _mm512_dpbusd_epi32(al[t][r], xl[t], wv);
                ah[t][r] = _mm512_dpbusd_epi32(ah[t][r], xh[t], wv);
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < GV_ROWS; r++) {
            int64_t l = _mm512_reduce_add_epi32(al[t][r]);
            int64_t h = (int64_t)_mm512_reduce_add_epi32(ah[t][r]) - 128 * (int64_t)wsum[r];
            for (int k = kv; k < K; k++) {
                l += (int64_t)x[t][k] * w[r][k];
                h += (int64_t)((int)x[t][K + k] - 128) * w[r][k];
            }
            acc[t][r] = (float)(256.0 * (double)h + (double)l);
        }
}

/* x row (bf16 or fp32) -> the 16-bit fixed point bytes gv_i8x16 reads; returns the x scale */
static inline float gv_x16_quant(const void *x, int x_bf16, int K, uint8_t *dst) {
    float amax = 0.f, z = 0.f; /* z = sum of x * 0: NaN where x holds a NaN or an inf, else 0 */
#pragma omp simd reduction(max : amax) reduction(+ : z)
    for (int k = 0; k < K; k++) {
        float v = load_f(x, k, x_bf16);
        amax = fmaxf(amax, fabsf(v));
        z += v * 0.f;
    }
    float sc = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / sc;
#pragma omp simd
    for (int k = 0; k < K; k++) {
        int q = (int)nearbyintf(load_f(x, k, x_bf16) * inv);
        q = q > 32767 ? 32767 : (q < -32767 ? -32767 : q);
        dst[k] = (uint8_t)(q & 255);
        dst[K + k] = (uint8_t)(((q >> 8) + 128) & 255);
    }
    return sc + z; /* fmaxf skips NaN: without z a NaN in x would give finite outputs */
}
#endif

#else /* no AVX-512: plain loops GCC vectorizes for the tier (AVX2) */

#define GV_GENERIC(NAME, XT, WT, XV, WV)                                                              \
    GV_INLINE void NAME(const XT *const *x, int NT, const WT *const *w, int K, float acc[GV_TOK][GV_ROWS]) { \
        for (int t = 0; t < NT; t++)                                                                  \
            for (int r = 0; r < GV_ROWS; r++) {                                                       \
                const XT *xr = x[t];                                                                  \
                const WT *wr = w[r];                                                                  \
                float a = 0.f;                                                                        \
                _Pragma("omp simd reduction(+ : a)") for (int k = 0; k < K; k++) a += (XV) * (WV);    \
                acc[t][r] = a;                                                                        \
            }                                                                                         \
    }
GV_GENERIC(gv_f32_nt, float, float, xr[k], wr[k])
GV_GENERIC(gv_bf16w_nt, float, bf16_t, xr[k], bf16_to_f32(wr[k]))
GV_GENERIC(gv_i8w_nt, float, int8_t, xr[k], (float)wr[k])
#undef GV_GENERIC
#endif

/* The NT-specialized entries: NT a literal in each call, so the accumulators stay in
 * registers. ``nt`` may be 1..GV_TOK. */
#define GV_DISPATCH(FN, XT, WT)                                                                      \
    static inline void FN##_x(const XT *const *x, int nt, const WT *const *w, int K, float acc[GV_TOK][GV_ROWS]) { \
        switch (nt) {                                                                                \
        case 1: FN##_nt(x, 1, w, K, acc); break;                                                     \
        case 2: FN##_nt(x, 2, w, K, acc); break;                                                     \
        case 3: FN##_nt(x, 3, w, K, acc); break;                                                     \
        default: FN##_nt(x, 4, w, K, acc); break;                                                    \
        }                                                                                            \
    }
GV_DISPATCH(gv_f32, float, float)
GV_DISPATCH(gv_bf16w, float, bf16_t)
GV_DISPATCH(gv_i8w, float, int8_t)
#ifdef __AVX512BF16__
GV_DISPATCH(gv_bf16dot, bf16_t, bf16_t)
#endif
#undef GV_DISPATCH
#ifdef __AVX512VNNI__
static inline void gv_i8x16_x(const uint8_t *const *x, int nt, const int8_t *const *w, const int32_t *wsum, int K,
                              float acc[GV_TOK][GV_ROWS]) {
    switch (nt) {
    case 1: gv_i8x16_nt(x, 1, w, wsum, K, acc); break;
    case 2: gv_i8x16_nt(x, 2, w, wsum, K, acc); break;
    case 3: gv_i8x16_nt(x, 3, w, wsum, K, acc); break;
    default: gv_i8x16_nt(x, 4, w, wsum, K, acc); break;
    }
}
#endif
#endif
