/* Decode GEMVs (any M; built for M = 1..16) on quantized weights, laid out so each thread
 * streams one contiguous run of bytes and every vector load feeds the dot instructions
 * directly (no per-row horizontal sums).
 *
 * int4 "x16" layout (quant.interleave_int4): rows in blocks of 16 (the last block padded
 * with zero weights), K in chunks of 8; one chunk of one block is 64 bytes = 32 little-endian
 * words, word 2i + e of row i holding in nibble j (bits 4j..4j+3) the stored value q + 8 of
 * column 8c + 2j + e. Shifting the 64 bytes right by 4j and looking each word's low nibble up
 * in a bf16 table (VPERMW reads only an index's low 5 bits) gives 32 bf16 weights whose lane
 * pair (2i, 2i+1) is row i's columns (8c + 2j, 8c + 2j + 1): one VDPBF16PS against x's pair
 * broadcast adds both products into row i's lane. One 64-byte load -> four dot instructions
 * for 16 rows x 8 columns. Scales: [blocks][groups][16] fp32, applied once per group.
 *
 * int8 weight-only and W8A8 keep the row-major [N, K] tensor (the HAL contract's int8 layout,
 * which conformance and the references read); their kernels walk one row at a time with four
 * independent accumulators, so a thread's weights are one sequential stream (the four-row
 * kernels of linear.c interleave four streams per thread; they still run M > 2, and
 * hs_set_qkernels(0) selects them for every M, for A/B timing).
 *
 * Every output's arithmetic depends only on K, the layout and the build, never on M or on
 * which rows share a block: batch-invariant. */
#include "common.h"
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define INL static inline __attribute__((always_inline))
#define MT_MAX 4 /* activation rows per pass over a block's chunk (accumulators: 4 per row) */

extern int hs_pf_bytes; /* linear.c: software prefetch distance, 0 = off */
int hs_qkernels = 1;    /* 1: the sequential int8 kernels here; 0: linear.c's four-row ones */
void hs_set_qkernels(int v) { hs_qkernels = v; }
/* these kernels' own prefetch distance in bytes (0 off); negative: linear.c's (bf16) one */
static int q_pf = -1;
void hs_set_qprefetch(int bytes) { q_pf = bytes; }
static inline int qpf(void) { return q_pf < 0 ? hs_pf_bytes : q_pf; }

static inline void put(void *y, int64_t i, float v, int ybf) {
    if (ybf) ((bf16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

/* the 16 outputs of block b for activation row m (only rows < N exist) */
static inline void put16(void *y, int ybf, int m, int N, int b, const float *v, const float *bias) {
    int n0 = b * 16, nr = N - n0 < 16 ? N - n0 : 16;
    for (int i = 0; i < nr; i++) put(y, (int64_t)m * N + n0 + i, bias ? v[i] + bias[n0 + i] : v[i], ybf);
}

/* ---- int4 x16, bf16 x: VDPBF16PS ---------------------------------------------------- */
#ifdef __AVX512BF16__
INL void i4x16_bf16_tile(const bf16_t *x, int K, const uint8_t *wb, const float *sb, int group, int mt_,
                         const int MT, float out[MT_MAX][16]) {
    const __m512i table = _mm512_set_epi16(
        /* lanes 31..0: bf16 of (i & 15) - 8 */
        0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000, 0xbf80, 0xc000, 0xc040, 0xc080, 0xc0a0,
        0xc0c0, 0xc0e0, 0xc100, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000, 0xbf80, 0xc000,
        0xc040, 0xc080, 0xc0a0, 0xc0c0, 0xc0e0, 0xc100);
    int ng = K / group, cpg = group / 8, pf = qpf();
    __m512 tot[MT_MAX];
    for (int t = 0; t < MT; t++) tot[t] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512 a[MT_MAX][4];
        for (int t = 0; t < MT; t++)
            for (int j = 0; j < 4; j++) a[t][j] = _mm512_setzero_ps();
        for (int c = g * cpg; c < (g + 1) * cpg; c++) {
            const uint8_t *p = wb + (int64_t)c * 64;
            if (pf) _mm_prefetch((const char *)p + pf, _MM_HINT_T0);
            __m512i v = _mm512_loadu_si512((const void *)p);
            __m512bh w[4];
            w[0] = (__m512bh)_mm512_permutexvar_epi16(v, table);
            w[1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
            w[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table);
            w[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table);
            for (int t = 0; t < MT; t++) {
                const int32_t *xp = (const int32_t *)(x + (int64_t)t * K + (int64_t)c * 8);
                for (int j = 0; j < 4; j++)
                    a[t][j] = _mm512_dpbf16_ps(a[t][j], (__m512bh)_mm512_set1_epi32(xp[j]), w[j]);
            }
        }
        __m512 s = _mm512_loadu_ps(sb + (int64_t)g * 16);
        for (int t = 0; t < MT; t++)
            tot[t] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a[t][0], a[t][1]), _mm512_add_ps(a[t][2], a[t][3])),
                                     s, tot[t]);
    }
    for (int t = 0; t < MT; t++) _mm512_storeu_ps(out[t], tot[t]);
    (void)mt_;
}
#endif

/* ---- int4 x16, float x: widen to fp32 ------------------------------------------------ */
#ifdef __AVX512F__
INL void i4x16_f32_tile(const float *x, int K, const uint8_t *wb, const float *sb, int group, int mt_, const int MT,
                        float out[MT_MAX][16]) {
    const __m512i nib = _mm512_set1_epi32(0x000f000f), lo16 = _mm512_set1_epi32(0xffff);
    const __m512 eight = _mm512_set1_ps(8.f);
    int ng = K / group, cpg = group / 8, pf = qpf();
    __m512 tot[MT_MAX];
    for (int t = 0; t < MT; t++) tot[t] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512 a[MT_MAX][4];
        for (int t = 0; t < MT; t++)
            for (int j = 0; j < 4; j++) a[t][j] = _mm512_setzero_ps();
        for (int c = g * cpg; c < (g + 1) * cpg; c++) {
            const uint8_t *p = wb + (int64_t)c * 64;
            if (pf) _mm_prefetch((const char *)p + pf, _MM_HINT_T0);
            __m512i v = _mm512_loadu_si512((const void *)p);
            __m512 w[4][2];
            for (int j = 0; j < 4; j++) {
                __m512i q = _mm512_and_si512(_mm512_srli_epi16(v, 4 * j), nib);
                w[j][0] = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, lo16)), eight);
                w[j][1] = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 16)), eight);
            }
            for (int t = 0; t < MT; t++) {
                const float *xp = x + (int64_t)t * K + (int64_t)c * 8;
                for (int j = 0; j < 4; j++) {
                    a[t][j] = _mm512_fmadd_ps(_mm512_set1_ps(xp[2 * j]), w[j][0], a[t][j]);
                    a[t][j] = _mm512_fmadd_ps(_mm512_set1_ps(xp[2 * j + 1]), w[j][1], a[t][j]);
                }
            }
        }
        __m512 s = _mm512_loadu_ps(sb + (int64_t)g * 16);
        for (int t = 0; t < MT; t++)
            tot[t] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a[t][0], a[t][1]), _mm512_add_ps(a[t][2], a[t][3])),
                                     s, tot[t]);
    }
    for (int t = 0; t < MT; t++) _mm512_storeu_ps(out[t], tot[t]);
    (void)mt_;
}
#else
/* portable: decode a chunk to floats, then plain loops (GCC vectorizes them per tier) */
static void i4x16_f32_tile(const float *x, int K, const uint8_t *wb, const float *sb, int group, int mt, int MT,
                           float out[MT_MAX][16]) {
    int ng = K / group, cpg = group / 8;
    (void)MT;
    for (int t = 0; t < mt; t++)
        for (int i = 0; i < 16; i++) out[t][i] = 0.f;
    for (int g = 0; g < ng; g++) {
        float a[MT_MAX][16] = {{0.f}};
        for (int c = g * cpg; c < (g + 1) * cpg; c++) {
            const uint8_t *p = wb + (int64_t)c * 64;
            float wf[8][16]; /* [column in chunk][row] */
            for (int wd = 0; wd < 32; wd++) {
                unsigned word = p[2 * wd] | ((unsigned)p[2 * wd + 1] << 8);
                for (int j = 0; j < 4; j++) wf[2 * j + (wd & 1)][wd >> 1] = (float)((int)((word >> (4 * j)) & 15) - 8);
            }
            for (int t = 0; t < mt; t++) {
                const float *xp = x + (int64_t)t * K + (int64_t)c * 8;
                for (int kk = 0; kk < 8; kk++)
                    for (int i = 0; i < 16; i++) a[t][i] += xp[kk] * wf[kk][i];
            }
        }
        const float *s = sb + (int64_t)g * 16;
        for (int t = 0; t < mt; t++)
            for (int i = 0; i < 16; i++) out[t][i] += a[t][i] * s[i];
    }
}
#endif

/* per calling thread, grown never shrunk (no malloc per call once warm) */
static __thread float *xf_buf;
static __thread int64_t xf_cap;

static const float *as_f32(const void *x, int x_bf16, int64_t n) {
    if (!x_bf16) return (const float *)x;
    if (n > xf_cap) {
        free(xf_buf);
        xf_buf = (float *)malloc((size_t)n * 4);
        xf_cap = n;
    }
    row_to_f32(x, 0, (int)n, 1, xf_buf);
    return xf_buf;
}

/* y[M, N] = x[M, K] @ W^T (+ bias) for int4 x16 weights; K % group == 0, group % 8 == 0. */
void hs_linear_i4x16(const void *x, int x_bf16, int M, int K, const uint8_t *w, const float *scales, int group,
                     int N, const float *bias, void *y, int y_bf16) {
    int nb = (N + 15) / 16;
    int64_t bstride = (int64_t)(K / 8) * 64, sstride = (int64_t)(K / group) * 16;
#ifdef __AVX512BF16__
    if (x_bf16) {
        const bf16_t *xb = (const bf16_t *)x;
#pragma omp parallel for schedule(static)
        for (int b = 0; b < nb; b++) {
            float out[MT_MAX][16];
            for (int m0 = 0; m0 < M; m0 += MT_MAX) {
                int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
                const bf16_t *xm = xb + (int64_t)m0 * K;
                const uint8_t *wb = w + b * bstride;
                const float *sb = scales + b * sstride;
                switch (mt) {
                case 4: i4x16_bf16_tile(xm, K, wb, sb, group, mt, 4, out); break;
                case 3: i4x16_bf16_tile(xm, K, wb, sb, group, mt, 3, out); break;
                case 2: i4x16_bf16_tile(xm, K, wb, sb, group, mt, 2, out); break;
                default: i4x16_bf16_tile(xm, K, wb, sb, group, mt, 1, out); break;
                }
                for (int t = 0; t < mt; t++) put16(y, y_bf16, m0 + t, N, b, out[t], bias);
            }
        }
        return;
    }
#endif
    const float *xf = as_f32(x, x_bf16, (int64_t)M * K);
#ifdef __AVX512F__
    const int step = MT_MAX;
#else
    const int step = 1; /* the portable loops vectorize differently per row count: one row a pass */
#endif
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nb; b++) {
        float out[MT_MAX][16];
        for (int m0 = 0; m0 < M; m0 += step) {
            int mt = M - m0 < step ? M - m0 : step;
            const float *xm = xf + (int64_t)m0 * K;
            const uint8_t *wb = w + b * bstride;
            const float *sb = scales + b * sstride;
            switch (mt) {
            case 4: i4x16_f32_tile(xm, K, wb, sb, group, mt, 4, out); break;
            case 3: i4x16_f32_tile(xm, K, wb, sb, group, mt, 3, out); break;
            case 2: i4x16_f32_tile(xm, K, wb, sb, group, mt, 2, out); break;
            default: i4x16_f32_tile(xm, K, wb, sb, group, mt, 1, out); break;
            }
            for (int t = 0; t < mt; t++) put16(y, y_bf16, m0 + t, N, b, out[t], bias);
        }
    }
}

/* ---- int8 row-major, one row at a time ---------------------------------------------- */
#ifdef __AVX512VNNI__
/* sum over k < kv (a multiple of 64) of the unsigned x bytes times the signed weight
 * bytes, four independent accumulators (VPDPBUSD's latency would otherwise bound it) */
INL int32_t dot_u8s8(const uint8_t *x, const int8_t *w, int kv, int pf) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int k = 0;
    for (; k + 256 <= kv; k += 256) {
        if (pf) {
            _mm_prefetch((const char *)(w + k) + pf, _MM_HINT_T0);
            _mm_prefetch((const char *)(w + k) + pf + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)(w + k) + pf + 128, _MM_HINT_T0);
            _mm_prefetch((const char *)(w + k) + pf + 192, _MM_HINT_T0);
        }
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512((const void *)(x + k)), _mm512_loadu_si512((const void *)(w + k)));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512((const void *)(x + k + 64)),
                                 _mm512_loadu_si512((const void *)(w + k + 64)));
        a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512((const void *)(x + k + 128)),
                                 _mm512_loadu_si512((const void *)(w + k + 128)));
        a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512((const void *)(x + k + 192)),
                                 _mm512_loadu_si512((const void *)(w + k + 192)));
    }
    for (; k < kv; k += 64) {
        if (pf) _mm_prefetch((const char *)(w + k) + pf, _MM_HINT_T0);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512((const void *)(x + k)), _mm512_loadu_si512((const void *)(w + k)));
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
}

/* both byte planes of a 16-bit x against one weight row in one pass (each weight vector
 * loaded once, two dots); two k phases keep four chains in flight */
INL void dot2_u8s8(const uint8_t *lo, const uint8_t *hi, const int8_t *w, int kv, int pf, int32_t *sl, int32_t *sh) {
    __m512i l0 = _mm512_setzero_si512(), l1 = l0, h0 = l0, h1 = l0;
    int k = 0;
    for (; k + 128 <= kv; k += 128) {
        if (pf) {
            _mm_prefetch((const char *)(w + k) + pf, _MM_HINT_T0);
            _mm_prefetch((const char *)(w + k) + pf + 64, _MM_HINT_T0);
        }
        __m512i w0 = _mm512_loadu_si512((const void *)(w + k)), w1 = _mm512_loadu_si512((const void *)(w + k + 64));
        l0 = _mm512_dpbusd_epi32(l0, _mm512_loadu_si512((const void *)(lo + k)), w0);
        h0 = _mm512_dpbusd_epi32(h0, _mm512_loadu_si512((const void *)(hi + k)), w0);
        l1 = _mm512_dpbusd_epi32(l1, _mm512_loadu_si512((const void *)(lo + k + 64)), w1);
        h1 = _mm512_dpbusd_epi32(h1, _mm512_loadu_si512((const void *)(hi + k + 64)), w1);
    }
    if (k < kv) {
        if (pf) _mm_prefetch((const char *)(w + k) + pf, _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512((const void *)(w + k));
        l0 = _mm512_dpbusd_epi32(l0, _mm512_loadu_si512((const void *)(lo + k)), w0);
        h0 = _mm512_dpbusd_epi32(h0, _mm512_loadu_si512((const void *)(hi + k)), w0);
    }
    *sl = _mm512_reduce_add_epi32(_mm512_add_epi32(l0, l1));
    *sh = _mm512_reduce_add_epi32(_mm512_add_epi32(h0, h1));
}

/* int8 weight-only, bf16 x: x as per-row 16-bit fixed point q = 256 h + l (l unsigned, h
 * offset by 128), both byte planes against each weight vector; the arithmetic of linear.c's
 * hs_linear_i8_x16 (the same grid, the same exact integer dots), one row at a time. xb: 2 M K
 * bytes (planes made by the caller), xs: M scales, wsum: row sums over k < K & ~63. */
void hs_linear_i8_seq(const uint8_t *xb, const float *xs, int M, int K, const int8_t *w, const float *scale, int N,
                      const float *bias, void *y, int y_bf16, const int32_t *wsum) {
    int kv = K & ~63, pf = qpf();
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *wr = w + (int64_t)n * K;
        for (int m = 0; m < M; m++) {
            const uint8_t *lo = xb + (int64_t)m * 2 * K, *hi = lo + K;
            int32_t sl, sh;
            dot2_u8s8(lo, hi, wr, kv, m == 0 ? pf : 0, &sl, &sh);
            int64_t l = sl, h = (int64_t)sh - 128 * (int64_t)wsum[n];
            for (int k = kv; k < K; k++) {
                l += (int64_t)lo[k] * wr[k];
                h += (int64_t)((int)hi[k] - 128) * wr[k];
            }
            double dot = 256.0 * (double)h + (double)l;
            float v = (float)(dot * xs[m]) * scale[n];
            put(y, (int64_t)m * N + n, bias ? v + bias[n] : v, y_bf16);
        }
    }
}

/* W8A8: xu = xq ^ 0x80 (M K bytes), exact int32 dots less 128 x the row sum */
void hs_linear_w8a8_seq(const int8_t *xq, const uint8_t *xu, const float *xs, int M, int K, const int8_t *w,
                        const float *scale, int N, const float *bias, void *y, int y_bf16, const int32_t *wsum) {
    int kv = K & ~63, pf = qpf();
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *wr = w + (int64_t)n * K;
        for (int m = 0; m < M; m++) {
            int32_t a = dot_u8s8(xu + (int64_t)m * K, wr, kv, m == 0 ? pf : 0) - 128 * wsum[n];
            for (int k = kv; k < K; k++) a += (int32_t)xq[(int64_t)m * K + k] * (int32_t)wr[k];
            float v = (float)a * xs[m] * scale[n];
            put(y, (int64_t)m * N + n, bias ? v + bias[n] : v, y_bf16);
        }
    }
}
#endif
