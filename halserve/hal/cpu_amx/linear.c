/* y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for weights in the layouts pack_weight makes.
 * Work is split over N (output rows) across the thread pool, so a batch-1 decode streams
 * every weight byte exactly once with all cores reading, each thread a contiguous run of
 * rows. Four weight rows go together so each x load feeds four independent accumulators
 * (FMA latency, not bandwidth, would otherwise bound one core). Each output's reduction
 * order depends only on K, the x dtype and the build, never on M: batch-invariant by
 * construction. ``hs_linear`` is the one entry: x and y in the model's dtype (no
 * conversion passes in Python), weights by kind. */
#include "common.h"
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define ROWS 4

/* linear_q.c. Its one-row int8 kernels read every activation row per weight row: beyond a
 * few rows the activations outgrow L1 and the four-row kernels here (each x load feeding four
 * rows) win (2-vCPU box: M = 16 1.5-2x slower one row at a time). Same bits either way. */
#define SEQ_M 2
extern int hs_qkernels;
int hs_linear_i4x16(const void *x, int x_bf16, int M, int K, const uint8_t *w, const float *scales, int group,
                    int N, const float *bias, void *y, int y_bf16);
void hs_linear_i8_seq(const uint8_t *xb, const float *xs, int M, int K, const int8_t *w, const float *scale, int N,
                      const float *bias, void *y, int y_bf16, const int32_t *wsum);
void hs_linear_w8a8_seq(const int8_t *xq, const uint8_t *xu, const float *xs, int M, int K, const int8_t *w,
                        const float *scale, int N, const float *bias, void *y, int y_bf16, const int32_t *wsum);
int hs_linear_i8_amx(const uint8_t *xb, int64_t mstride, int np, const int8_t *xq, const float *xs, int M, int K,
                     const int8_t *w, const float *scale, int N, const float *bias, void *y, int y_bf16,
                     const int32_t *wsum);

/* y is bfloat16 (ybf: each kernel's own argument, not a global: two Python threads may run
 * linears of two dtypes at once, and a bf16 y written as float32 runs past its end) */
static inline void finish_(void *y, int64_t m, int N, int n, float v, const float *bias, int ybf) {
    store_f(y, m * N + n, bias ? v + bias[n] : v, ybf);
}
#define finish(y, m, N, n, v, bias) finish_(y, m, N, n, v, bias, ybf)

/* software prefetch distance in bytes ahead of each weight row's stream (0: off); set
 * from Python so the perf tool can sweep it on the machine at hand */
int hs_pf_bytes = 512; /* +5-10% on the AMX host for bf16 (device run 2026-12-04 16:01); linear_q.c reads it */
void hs_set_prefetch(int bytes) { hs_pf_bytes = bytes > 0 ? bytes : 0; }
#define pf_bytes hs_pf_bytes
#ifdef __AVX512F__
#define PF(p) do { if (pf_bytes) _mm_prefetch((const char *)(p) + pf_bytes, _MM_HINT_T0); } while (0)
#else
#define PF(p) do { } while (0)
#endif
/* the int8 byte-dot kernels prefetch at linear_q.c's distance (qd, read once per call) */
int hs_qpf(void);
#define PFQ(p) do { if (qd) _mm_prefetch((const char *)(p) + qd, _MM_HINT_T0); } while (0)

static void hs_linear_f(const float *x, int M, int K, const void *w, int w_bf16, int N,
                 const float *bias, float *y, int ybf) {
    int nblk = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblk; b++) {
        int n0 = b * ROWS;
        if (n0 + ROWS <= N) {
            for (int m = 0; m < M; m++) {
                const float *xr = x + (int64_t)m * K;
                float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
                if (w_bf16) {
                    const bf16_t *w0 = (const bf16_t *)w + (int64_t)n0 * K;
                    const bf16_t *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
                    int k0 = 0;
#ifdef __AVX512F__
                    /* bf16 -> fp32 is a 16-bit shift: widen, shift, reinterpret, FMA */
                    __m512 v0 = _mm512_setzero_ps(), v1 = v0, v2 = v0, v3 = v0;
                    for (; k0 + 16 <= K; k0 += 16) {
                        if (!(k0 & 31)) {
                            PF(w0 + k0); PF(w1 + k0); PF(w2 + k0); PF(w3 + k0);
                        }
                        __m512 xv = _mm512_loadu_ps(xr + k0);
#define HS_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32( \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((p) + k0))), 16))
                        v0 = _mm512_fmadd_ps(xv, HS_BF16(w0), v0);
                        v1 = _mm512_fmadd_ps(xv, HS_BF16(w1), v1);
                        v2 = _mm512_fmadd_ps(xv, HS_BF16(w2), v2);
                        v3 = _mm512_fmadd_ps(xv, HS_BF16(w3), v3);
#undef HS_BF16
                    }
                    a0 = _mm512_reduce_add_ps(v0);
                    a1 = _mm512_reduce_add_ps(v1);
                    a2 = _mm512_reduce_add_ps(v2);
                    a3 = _mm512_reduce_add_ps(v3);
#endif
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                    for (int k = k0; k < K; k++) {
                        float xv = xr[k];
                        a0 += xv * bf16_to_f32(w0[k]);
                        a1 += xv * bf16_to_f32(w1[k]);
                        a2 += xv * bf16_to_f32(w2[k]);
                        a3 += xv * bf16_to_f32(w3[k]);
                    }
                } else {
                    const float *w0 = (const float *)w + (int64_t)n0 * K;
                    const float *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                    for (int k = 0; k < K; k++) {
                        float xv = xr[k];
                        a0 += xv * w0[k];
                        a1 += xv * w1[k];
                        a2 += xv * w2[k];
                        a3 += xv * w3[k];
                    }
                }
                finish(y, m, N, n0, a0, bias);
                finish(y, m, N, n0 + 1, a1, bias);
                finish(y, m, N, n0 + 2, a2, bias);
                finish(y, m, N, n0 + 3, a3, bias);
            }
        } else {
            for (int n = n0; n < N; n++)
                for (int m = 0; m < M; m++) {
                    const float *xr = x + (int64_t)m * K;
                    float a = 0.f;
                    if (w_bf16) {
                        const bf16_t *wr = (const bf16_t *)w + (int64_t)n * K;
#pragma omp simd reduction(+ : a)
                        for (int k = 0; k < K; k++) a += xr[k] * bf16_to_f32(wr[k]);
                    } else {
                        const float *wr = (const float *)w + (int64_t)n * K;
#pragma omp simd reduction(+ : a)
                        for (int k = 0; k < K; k++) a += xr[k] * wr[k];
                    }
                    finish(y, m, N, n, a, bias);
                }
        }
    }
}

/* int8 weight-only: per-channel scale applied once per output after the dot. */
static void hs_linear_i8(const float *x, int M, int K, const int8_t *w, const float *scale, int N,
                  const float *bias, float *y, int ybf) {
    int nblk = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblk; b++) {
        int n0 = b * ROWS;
        if (n0 + ROWS <= N) {
            const int8_t *w0 = w + (int64_t)n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
            for (int m = 0; m < M; m++) {
                const float *xr = x + (int64_t)m * K;
                float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                for (int k = 0; k < K; k++) {
                    float xv = xr[k];
                    a0 += xv * (float)w0[k];
                    a1 += xv * (float)w1[k];
                    a2 += xv * (float)w2[k];
                    a3 += xv * (float)w3[k];
                }
                finish(y, m, N, n0, a0 * scale[n0], bias);
                finish(y, m, N, n0 + 1, a1 * scale[n0 + 1], bias);
                finish(y, m, N, n0 + 2, a2 * scale[n0 + 2], bias);
                finish(y, m, N, n0 + 3, a3 * scale[n0 + 3], bias);
            }
        } else {
            for (int n = n0; n < N; n++) {
                const int8_t *wr = w + (int64_t)n * K;
                for (int m = 0; m < M; m++) {
                    const float *xr = x + (int64_t)m * K;
                    float a = 0.f;
#pragma omp simd reduction(+ : a)
                    for (int k = 0; k < K; k++) a += xr[k] * (float)wr[k];
                    finish(y, m, N, n, a * scale[n], bias);
                }
            }
        }
    }
}

/* Dynamic per-token symmetric int8 activations (round half to even, as torch.round). */
static void hs_quant_rows_i8(const float *x, int M, int K, int8_t *xq, float *xs) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (int64_t)m * K;
        float amax = 0.f, z = 0.f; /* z: NaN where x holds a NaN or an inf (fmaxf skips NaN) */
        for (int k = 0; k < K; k++) {
            amax = fmaxf(amax, fabsf(xr[k]));
            z += xr[k] * 0.f;
        }
        float s = fmaxf(amax, 1e-12f) / 127.f;
        xs[m] = s + z;
        for (int k = 0; k < K; k++) {
            float q = nearbyintf(xr[k] / s);
            q = fminf(fmaxf(q, -127.f), 127.f);
            xq[(int64_t)m * K + k] = (int8_t)q;
        }
    }
}

/* W8A8: exact int32 dots (VNNI / madd), scaled once by token x channel. */
static void hs_linear_w8a8(const int8_t *xq, const float *xs, int M, int K, const int8_t *w,
                    const float *scale, int N, const float *bias, float *y, int ybf) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *wr = w + (int64_t)n * K;
        for (int m = 0; m < M; m++) {
            const int8_t *xr = xq + (int64_t)m * K;
            int32_t a = 0;
#pragma omp simd reduction(+ : a)
            for (int k = 0; k < K; k++) a += (int32_t)xr[k] * (int32_t)wr[k];
            finish(y, m, N, n, (float)a * xs[m] * scale[n], bias);
        }
    }
}

/* int4 weight-only, group-wise: row n holds K/2 bytes; within each 32-value chunk byte j
 * carries value j (low nibble) and value j + 16 (high nibble), stored as q + 8, so both
 * halves meet contiguous x. One fp32 scale per group of ``group`` values. */
static void hs_linear_i4(const float *x, int M, int K, const uint8_t *w, const float *scales, int group,
                  int N, const float *bias, float *y, int ybf) {
    int ng = K / group, cpg = group / 32;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *wr = w + (int64_t)n * (K / 2);
        const float *sr = scales + (int64_t)n * ng;
        for (int m = 0; m < M; m++) {
            const float *xr = x + (int64_t)m * K;
#ifdef __AVX512F__
            /* per chunk: 16 bytes -> 16 lanes -> low and high nibbles meet x[0:16], x[16:32] */
            __m512 v = _mm512_setzero_ps();
            const __m512i lo4 = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
            for (int g = 0; g < ng; g++) {
                __m512 a = _mm512_setzero_ps();
                for (int c = 0; c < cpg; c++) {
                    const uint8_t *wb = wr + (int64_t)(g * cpg + c) * 16;
                    const float *xc = xr + (int64_t)(g * cpg + c) * 32;
                    __m512i bi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)wb));
                    __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bi, lo4), eight));
                    __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bi, 4), eight));
                    a = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xc), a);
                    a = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xc + 16), a);
                }
                v = _mm512_fmadd_ps(a, _mm512_set1_ps(sr[g]), v);
            }
            float acc = _mm512_reduce_add_ps(v);
#else
            /* one vector of partial sums for the whole row (scale folded in per group):
             * a horizontal sum per group would cost more than the group's arithmetic */
            float v[16] = {0.f};
            for (int g = 0; g < ng; g++) {
                float sg = sr[g];
                for (int c = 0; c < cpg; c++) {
                    const uint8_t *wb = wr + (int64_t)(g * cpg + c) * 16;
                    const float *xc = xr + (int64_t)(g * cpg + c) * 32;
#pragma omp simd
                    for (int j = 0; j < 16; j++)
                        v[j] += sg * (xc[j] * (float)((int)(wb[j] & 15) - 8) +
                                      xc[j + 16] * (float)((int)(wb[j] >> 4) - 8));
                }
            }
            float acc = 0.f;
            for (int j = 0; j < 16; j++) acc += v[j];
#endif
            finish(y, m, N, n, acc, bias);
        }
    }
}

#ifdef __AVX512BF16__
/* bf16 x . bf16 W with VDPBF16PS: the products of two bf16 are exact in fp32, so this is
 * the widening kernel's arithmetic with half the instructions (a pair of products per lane
 * per step). Only for bf16 x (a bf16 model's activations): fp32 x would be rounded. */
static void hs_linear_bf16dot(const bf16_t *x, int M, int K, const bf16_t *w, int N, const float *bias,
                              float *y, int ybf) {
    int nblk = (N + ROWS - 1) / ROWS, kv = K & ~31;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblk; b++) {
        int n0 = b * ROWS, nr = N - n0 < ROWS ? N - n0 : ROWS;
        const bf16_t *wr[ROWS];
        for (int r = 0; r < ROWS; r++) wr[r] = w + (int64_t)(n0 + (r < nr ? r : 0)) * K;
        for (int m = 0; m < M; m++) {
            const bf16_t *xr = x + (int64_t)m * K;
            __m512 v[ROWS];
            for (int r = 0; r < ROWS; r++) v[r] = _mm512_setzero_ps();
            for (int k0 = 0; k0 < kv; k0 += 32) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xr + k0));
                for (int r = 0; r < ROWS; r++) {
                    PF(wr[r] + k0);
                    v[r] = _mm512_dpbf16_ps(v[r], xv, (__m512bh)_mm512_loadu_si512((const void *)(wr[r] + k0)));
                }
            }
            for (int r = 0; r < nr; r++) {
                float a = _mm512_reduce_add_ps(v[r]);
                for (int k = kv; k < K; k++) a += bf16_to_f32(xr[k]) * bf16_to_f32(wr[r][k]);
                finish(y, m, N, n0 + r, a, bias);
            }
        }
    }
}
#endif

#ifdef __AVX512BF16__
/* int4 with bf16 x (AMX hosts): each nibble becomes the bf16 of q - 8 through a 32-entry
 * word table (VPERMW: the integers -8..7 are exact in bf16), then VDPBF16PS takes two exact
 * products per lane; one fp32 scale per group, applied to the group's partial sum as the
 * widening kernel does. Two 32-value chunks (32 bytes) per step: their low nibbles meet x
 * values [0:16) and [32:48) of the 64, the high nibbles [16:32) and [48:64), so x is
 * permuted once per call (xp) to match. Four rows share every x load. Needs group % 64 == 0. */
static void hs_linear_i4_bf16(const bf16_t *x, const bf16_t *xp, int M, int K, const uint8_t *w,
                              const float *scales, int group, int N, const float *bias, float *y, int ybf) {
    int nblk = (N + ROWS - 1) / ROWS, ng = K / group, ppg = group / 64;
    const __m512i lo4 = _mm512_set1_epi16(15);
    __m512i table;
    {
        bf16_t t[32];
        for (int i = 0; i < 32; i++) t[i] = f32_to_bf16((float)((i & 15) - 8));
        table = _mm512_loadu_si512((const void *)t);
    }
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblk; b++) {
        int n0 = b * ROWS, nr = N - n0 < ROWS ? N - n0 : ROWS;
        const uint8_t *wr[ROWS];
        const float *sr[ROWS];
        for (int r = 0; r < ROWS; r++) {
            int n = n0 + (r < nr ? r : 0);
            wr[r] = w + (int64_t)n * (K / 2);
            sr[r] = scales + (int64_t)n * ng;
        }
        for (int m = 0; m < M; m++) {
            const bf16_t *xm = xp + (int64_t)m * K;
            __m512 v[ROWS];
            for (int r = 0; r < ROWS; r++) v[r] = _mm512_setzero_ps();
            for (int g = 0; g < ng; g++) {
                __m512 a[ROWS];
                for (int r = 0; r < ROWS; r++) a[r] = _mm512_setzero_ps();
                for (int pp = 0; pp < ppg; pp++) {
                    int64_t p = (int64_t)g * ppg + pp;
                    __m512bh xlo = (__m512bh)_mm512_loadu_si512((const void *)(xm + p * 64));
                    __m512bh xhi = (__m512bh)_mm512_loadu_si512((const void *)(xm + p * 64 + 32));
                    for (int r = 0; r < ROWS; r++) {
                        PF(wr[r] + p * 32);
                        __m512i bw = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wr[r] + p * 32)));
                        __m512i wl = _mm512_permutexvar_epi16(_mm512_and_si512(bw, lo4), table);
                        __m512i wh = _mm512_permutexvar_epi16(_mm512_srli_epi16(bw, 4), table);
                        a[r] = _mm512_dpbf16_ps(a[r], xlo, (__m512bh)wl);
                        a[r] = _mm512_dpbf16_ps(a[r], xhi, (__m512bh)wh);
                    }
                }
                for (int r = 0; r < ROWS; r++) v[r] = _mm512_fmadd_ps(a[r], _mm512_set1_ps(sr[r][g]), v[r]);
            }
            for (int r = 0; r < nr; r++) finish(y, m, N, n0 + r, _mm512_reduce_add_ps(v[r]), bias);
        }
    }
    (void)x;
}
#endif

#ifdef __AVX512VNNI__
/* W8A8 with VPDPBUSD (64 byte products per instruction): it multiplies unsigned by signed
 * bytes, so x goes in as xq + 128 (xq ^ 0x80) and 128 * sum(w) comes off, the row sums
 * made by the same instruction against ones. Exact int32 dots: bitwise what the scalar
 * kernel computes. */
static void hs_linear_w8a8_vnni(const int8_t *xq, const float *xs, int M, int K, const int8_t *w,
                                const float *scale, int N, const float *bias, float *y, uint8_t *xu,
                                const int32_t *wsum, int ybf) {
    int64_t mk = (int64_t)M * K;
    for (int64_t i = 0; i < mk; i++) xu[i] = (uint8_t)xq[i] ^ 0x80;
    int nblk = (N + ROWS - 1) / ROWS, kv = K & ~63, qd = hs_qpf();
    const __m512i ones = _mm512_set1_epi8(1);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblk; b++) {
        int n0 = b * ROWS, nr = N - n0 < ROWS ? N - n0 : ROWS;
        const int8_t *wr[ROWS];
        for (int r = 0; r < ROWS; r++) wr[r] = w + (int64_t)(n0 + (r < nr ? r : 0)) * K;
        for (int m = 0; m < M; m++) {
            const uint8_t *xr = xu + (int64_t)m * K;
            __m512i acc[ROWS], sw[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = sw[r] = _mm512_setzero_si512();
            for (int k0 = 0; k0 < kv; k0 += 64) {
                __m512i xv = _mm512_loadu_si512((const void *)(xr + k0));
                for (int r = 0; r < ROWS; r++) {
                    PFQ(wr[r] + k0);
                    __m512i wv = _mm512_loadu_si512((const void *)(wr[r] + k0));
                    acc[r] = _mm512_dpbusd_epi32(acc[r], xv, wv);
                    if (!wsum) sw[r] = _mm512_dpbusd_epi32(sw[r], ones, wv);
                }
            }
            for (int r = 0; r < nr; r++) {
                int32_t a = _mm512_reduce_add_epi32(acc[r]) -
                            128 * (wsum ? wsum[n0 + r] : _mm512_reduce_add_epi32(sw[r]));
                for (int k = kv; k < K; k++) a += (int32_t)xq[(int64_t)m * K + k] * (int32_t)wr[r][k];
                finish(y, m, N, n0 + r, (float)a * xs[m] * scale[n0 + r], bias);
            }
        }
    }
}
#endif

#ifdef __AVX512VNNI__
/* int8 weight-only with bf16 x (a bf16 model): x enters as per-row 16-bit fixed point,
 * q = round(x / s), s = amax / 32767, split into bytes q = 256 h + l (h signed, l unsigned),
 * and each half meets the int8 weights in VPDPBUSD (h as h ^ 0x80, less 128 x the row sum):
 * three byte-dot instructions per 64 weights instead of widening every weight to fp32. The
 * 16-bit grid (amax / 65534 at most from x) is finer than bf16's own step for every value
 * above amax / 256; the dots are exact integers, combined in double. */
static void i8_x16_planes(const bf16_t *x, int M, int K, uint8_t *xb, float *xs) {
    for (int m = 0; m < M; m++) {
        const bf16_t *xr = x + (int64_t)m * K;
        float amax = 0.f, z = 0.f; /* z = sum of x * 0: NaN where x holds a NaN or an inf, else 0 */
#pragma omp simd reduction(max : amax) reduction(+ : z)
        for (int k = 0; k < K; k++) {
            float v = bf16_to_f32(xr[k]);
            amax = fmaxf(amax, fabsf(v));
            z += v * 0.f;
        }
        float sc = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / sc;
        xs[m] = sc + z; /* fmaxf skips NaN: without z a NaN in x would give finite outputs */
        uint8_t *lo = xb + (int64_t)m * 2 * K, *hi = lo + K;
#pragma omp simd
        for (int k = 0; k < K; k++) {
            int q = (int)nearbyintf(bf16_to_f32(xr[k]) * inv);
            q = q > 32767 ? 32767 : (q < -32767 ? -32767 : q);
            lo[k] = (uint8_t)(q & 255);
            hi[k] = (uint8_t)(((q >> 8) + 128) & 255);  /* h = q >> 8 in [-128, 127], offset by 128 */
        }
    }
}

static void hs_linear_i8_x16(int M, int K, const int8_t *w, const float *scale, int N, const float *bias, float *y,
                             const uint8_t *xb, const float *xs, const int32_t *wsum, int ybf) {
    int nblk = (N + ROWS - 1) / ROWS, kv = K & ~63, qd = hs_qpf();
    const __m512i ones = _mm512_set1_epi8(1);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblk; b++) {
        int n0 = b * ROWS, nr = N - n0 < ROWS ? N - n0 : ROWS;
        const int8_t *wr[ROWS];
        for (int r = 0; r < ROWS; r++) wr[r] = w + (int64_t)(n0 + (r < nr ? r : 0)) * K;
        for (int m = 0; m < M; m++) {
            const uint8_t *lo = xb + (int64_t)m * 2 * K, *hi = lo + K;
            __m512i al[ROWS], ah[ROWS], sw[ROWS];
            for (int r = 0; r < ROWS; r++) al[r] = ah[r] = sw[r] = _mm512_setzero_si512();
            for (int k0 = 0; k0 < kv; k0 += 64) {
                __m512i xl = _mm512_loadu_si512((const void *)(lo + k0));
                __m512i xh = _mm512_loadu_si512((const void *)(hi + k0));
                for (int r = 0; r < ROWS; r++) {
                    PFQ(wr[r] + k0);
                    __m512i wv = _mm512_loadu_si512((const void *)(wr[r] + k0));
                    al[r] = _mm512_dpbusd_epi32(al[r], xl, wv);
                    ah[r] = _mm512_dpbusd_epi32(ah[r], xh, wv);
                    if (!wsum) sw[r] = _mm512_dpbusd_epi32(sw[r], ones, wv);
                }
            }
            for (int r = 0; r < nr; r++) {
                int64_t l = _mm512_reduce_add_epi32(al[r]);
                int64_t h = (int64_t)_mm512_reduce_add_epi32(ah[r]) -
                            128 * (int64_t)(wsum ? wsum[n0 + r] : _mm512_reduce_add_epi32(sw[r]));
                for (int k = kv; k < K; k++) {
                    l += (int64_t)lo[k] * wr[r][k];
                    h += (int64_t)((int)hi[k] - 128) * wr[r][k];
                }
                double dot = 256.0 * (double)h + (double)l;
                finish(y, m, N, n0 + r, (float)(dot * xs[m]) * scale[n0 + r], bias);
            }
        }
    }
}
#endif

/* per calling thread (the pool's workers only read them): x as float32, x quantized */
static __thread float *xf_buf;
static __thread int8_t *xq_buf;
static __thread int64_t xf_cap, xq_cap;
#ifdef __AVX512VNNI__
static __thread uint8_t *xu_buf;
static __thread int64_t xu_cap;
static __thread float *xs16_buf;
static __thread int64_t xs16_cap;
#endif
#ifdef __AVX512BF16__
static __thread bf16_t *xp_buf;
static __thread int64_t xp_cap;
#endif

const float *hs_x_as_f32(const void *x, int x_bf16, int64_t n) {
    if (!x_bf16) return (const float *)x;
    if (n > xf_cap) {
        free(xf_buf);
        xf_buf = (float *)malloc((size_t)n * 4);
        xf_cap = xf_buf ? n : 0;
        if (!xf_buf) return NULL; /* the caller returns -3: out of memory */
    }
    row_to_f32(x, 0, (int)n, 1, xf_buf);
    return xf_buf;
}

/* kind: 0 float32 W, 1 bfloat16 W, 2 int8 per-channel weight-only, 3 int4 group-wise,
 * 4 int8 W8A8 (per-token dynamic int8 x, exact int32 dots), 5 int4 group-wise in the x16
 * layout (linear_q.c; scale then in that layout too). xs: M floats of scratch for
 * W8A8's token scales. wsum (int8 kinds, may be NULL): each row's sum over its first K & ~63
 * values, made once at pack time, saves the byte-dot kernels one instruction in three.
 * Returns 0, -1 for an unknown kind, -3 out of memory for the activations' scratch. */
int hs_linear(const void *x, int x_bf16, int M, int K, const void *w, int kind, const float *scale,
              int group, int N, const float *bias, void *y, int y_bf16, float *xs,
              const int32_t *wsum) {
    if (kind == 5) return hs_linear_i4x16(x, x_bf16, M, K, (const uint8_t *)w, scale, group, N, bias, y, y_bf16);
#ifdef __AVX512BF16__
    if (kind == 1 && x_bf16) {
        hs_linear_bf16dot((const bf16_t *)x, M, K, (const bf16_t *)w, N, bias, (float *)y, y_bf16);
        return 0;
    }
#endif
#ifdef __AVX512BF16__
    if (kind == 3 && x_bf16 && group % 64 == 0 && K % 64 == 0) {
        if ((int64_t)M * K > xp_cap) {
            free(xp_buf);
            xp_buf = (bf16_t *)malloc((size_t)M * K * 2);
            xp_cap = xp_buf ? (int64_t)M * K : 0;
            if (!xp_buf) return -3;
        }
        const bf16_t *xb = (const bf16_t *)x;
        for (int64_t m = 0; m < M; m++)
            for (int p = 0; p < K / 64; p++)
                for (int i = 0; i < 16; i++) {
                    const bf16_t *s = xb + m * K + p * 64;
                    bf16_t *d = xp_buf + m * K + p * 64;
                    d[i] = s[i];
                    d[16 + i] = s[32 + i];
                    d[32 + i] = s[16 + i];
                    d[48 + i] = s[48 + i];
                }
        hs_linear_i4_bf16(xb, xp_buf, M, K, (const uint8_t *)w, scale, group, N, bias, (float *)y, y_bf16);
        return 0;
    }
#endif
#ifdef __AVX512VNNI__
    if (kind == 2 && x_bf16) {
        if ((int64_t)M * K * 2 > xu_cap) {
            free(xu_buf);
            xu_buf = (uint8_t *)malloc((size_t)M * K * 2);
            xu_cap = xu_buf ? (int64_t)M * K * 2 : 0;
            if (!xu_buf) return -3;
        }
        if (M > xs16_cap) {
            free(xs16_buf);
            xs16_buf = (float *)malloc((size_t)M * 4);
            xs16_cap = xs16_buf ? M : 0;
            if (!xs16_buf) return -3;
        }
        i8_x16_planes((const bf16_t *)x, M, K, xu_buf, xs16_buf);
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
        if ((hs_qkernels & 2) && wsum && M > SEQ_M && M <= 16) {
            return hs_linear_i8_amx(xu_buf, 2 * (int64_t)K, 2, NULL, xs16_buf, M, K, (const int8_t *)w, scale, N,
                                    bias, y, y_bf16, wsum);
        }
#endif
        if (hs_qkernels && wsum && M <= SEQ_M)
            hs_linear_i8_seq(xu_buf, xs16_buf, M, K, (const int8_t *)w, scale, N, bias, y, y_bf16, wsum);
        else
            hs_linear_i8_x16(M, K, (const int8_t *)w, scale, N, bias, (float *)y, xu_buf, xs16_buf, wsum, y_bf16);
        return 0;
    }
#endif
    const float *xf = hs_x_as_f32(x, x_bf16, (int64_t)M * K);
    if (!xf) return -3;
    switch (kind) {
    case 0:
    case 1:
        hs_linear_f(xf, M, K, w, kind, N, bias, (float *)y, y_bf16);
        return 0;
    case 2:
        hs_linear_i8(xf, M, K, (const int8_t *)w, scale, N, bias, (float *)y, y_bf16);
        return 0;
    case 3:
        hs_linear_i4(xf, M, K, (const uint8_t *)w, scale, group, N, bias, (float *)y, y_bf16);
        return 0;
    case 4:
        if ((int64_t)M * K > xq_cap) {
            free(xq_buf);
            xq_buf = (int8_t *)malloc((size_t)M * K);
            xq_cap = xq_buf ? (int64_t)M * K : 0;
            if (!xq_buf) return -3;
        }
        hs_quant_rows_i8(xf, M, K, xq_buf, xs);
#ifdef __AVX512VNNI__
        if ((int64_t)M * K > xu_cap) {
            free(xu_buf);
            xu_buf = (uint8_t *)malloc((size_t)M * K);
            xu_cap = xu_buf ? (int64_t)M * K : 0;
            if (!xu_buf) return -3;
        }
        int amx = 0;
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
        amx = (hs_qkernels & 2) && M > SEQ_M && M <= 16;
#endif
        if (hs_qkernels && wsum && (M <= SEQ_M || amx)) {
            int64_t mk = (int64_t)M * K;
            for (int64_t i = 0; i < mk; i++) xu_buf[i] = (uint8_t)xq_buf[i] ^ 0x80;
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
            if (amx) return hs_linear_i8_amx(xu_buf, K, 1, xq_buf, xs, M, K, (const int8_t *)w, scale, N, bias, y,
                                             y_bf16, wsum);
            else
#endif
                hs_linear_w8a8_seq(xq_buf, xu_buf, xs, M, K, (const int8_t *)w, scale, N, bias, y, y_bf16, wsum);
        } else {
            hs_linear_w8a8_vnni(xq_buf, xs, M, K, (const int8_t *)w, scale, N, bias, (float *)y, xu_buf, wsum, y_bf16);
        }
#else
        hs_linear_w8a8(xq_buf, xs, M, K, (const int8_t *)w, scale, N, bias, (float *)y, y_bf16);
#endif
        return 0;
    }
    return -1;
}
