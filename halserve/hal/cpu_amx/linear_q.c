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
 * which conformance and the references read). At M = 3..16 they run on AMX int8 tiles (below);
 * at M <= 2 the one-row kernels here (each thread one sequential stream, rows claimed in
 * chunks), or with hs_set_qkernels(0) linear.c's four-row VPDPBUSD kernels.
 *
 * Every output's arithmetic depends only on K, the layout and the build, never on M or on
 * which rows share a block: batch-invariant. */
#include "common.h"
#include <omp.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#else
#define _mm_pause() __asm__ __volatile__("" ::: "memory")
#endif

#define INL static inline __attribute__((always_inline))
#define MT_MAX 4 /* activation rows per pass over a block's chunk (accumulators: 4 per row) */

extern int hs_pf_bytes; /* linear.c: software prefetch distance, 0 = off */
/* the quantized kernels' own software-prefetch distance in bytes (0 off; negative: linear.c's
 * bf16 one). 2048: one thread streaming int4 x16 weights here ran 22-31% faster than at 512
 * (their decode takes ~10 cycles a 64-byte line, so 512 bytes covers ~80 cycles of a DRAM
 * miss); the int8 kernels 3-6% (2026-12-04, 1.1B shapes, `amxq.sh`'s sweep). */
static int q_pf = 2048;
void hs_set_qprefetch(int bytes) { q_pf = bytes; }
static inline int qpf(void) { return q_pf < 0 ? hs_pf_bytes : q_pf; }
int hs_qpf(void) { return qpf(); }

/* 0: linear.c's four-row int8 kernels at every M. Any other value: the one-row int8 kernels
 * here at M <= 2 (linear.c tests hs_qkernels != 0, so the default 2 runs them), and bit 1: AMX
 * int8 tiles at M = 3..16 (AMX builds); bit 2: a static split of the rows over the threads
 * instead of the claims below (A/B timing). All give the same bits: a speed choice. */
int hs_qkernels = 2;
void hs_set_qkernels(int v) { hs_qkernels = v; }
int hs_get_qkernels(void) { return hs_qkernels; }

/* ---- work claiming for the batch-1 GEMVs ----------------------------------------------
 * A parallel region starts its workers late: with sleeping workers (OMP_WAIT_POLICY=PASSIVE)
 * waking one on this 2-vCPU VM took 2-125 us (mean 70-125 us with the other vCPU idle), and
 * a decode token opens ~150 such regions. A static split then costs the whole delay (the
 * calling thread finishes its half and waits for the late half); here each thread owns a
 * contiguous run of chunks (one sequential stream, as a static split) but claims them one at
 * a time, and a thread whose run is done takes the next chunks of the others' runs: a late
 * worker finds part of its run already done. Which thread computes a row never changes its
 * arithmetic (same bits; batch invariance holds). The calling thread, done, waits for the
 * others in a short spin instead of the region's end barrier, so it is never the sleeper
 * the last worker must wake (a second wake-up on the critical path). */
#define Q_MAXT 64
#define Q_CHUNK_BYTES 65536 /* one chunk: ~10 us of streaming a core, so a claim's atomic is ~1% */
typedef struct {
    int next, end;
    char pad[56];
} __attribute__((aligned(64))) q_run; /* one cache line per run: the owners' claims do not contend */

/* sets up T runs over nchunks chunks (before the region) */
static inline int q_runs(q_run *r, int nchunks) {
    int T = omp_get_max_threads();
    T = T < 1 ? 1 : (T > Q_MAXT ? Q_MAXT : T);
    for (int t = 0; t < T; t++) {
        r[t].next = (int)((int64_t)nchunks * t / T);
        r[t].end = (int)((int64_t)nchunks * (t + 1) / T);
    }
    return T;
}

/* the next unclaimed chunk, own run first (*cur: the run this thread works on now); -1 when none */
static inline int q_claim(q_run *r, int T, int *cur) {
    for (int i = 0; i < T; i++) {
        q_run *u = &r[(*cur + i) % T];
        if (__atomic_load_n(&u->next, __ATOMIC_RELAXED) >= u->end) continue;
        int c = __atomic_fetch_add(&u->next, 1, __ATOMIC_RELAXED);
        if (c < u->end) {
            *cur = (*cur + i) % T;
            return c;
        }
        if (hs_qkernels & 4) return -1; /* the static split (A/B timing): own run only */
    }
    return -1;
}

/* called by every thread once its claims run dry: the calling thread spins (bounded, ~0.1-1
 * ms) until the others have too, so it reaches the end barrier last */
static inline void q_done(int *done) {
    __atomic_fetch_add(done, 1, __ATOMIC_ACQ_REL);
    if (omp_get_thread_num() != 0 || (hs_qkernels & 4)) return;
    int nt = omp_get_num_threads();
    for (int i = 0; i < 8192 && __atomic_load_n(done, __ATOMIC_ACQUIRE) < nt; i++) _mm_pause();
}

/* rows per chunk for a row-major weight of K bytes a row, at least 4 chunks a thread */
static inline int q_chunk_rows(int64_t row_bytes, int N) {
    int r = (int)(Q_CHUNK_BYTES / (row_bytes > 0 ? row_bytes : 1));
    int per = N / (4 * omp_get_max_threads());
    if (r > per) r = per;
    return r < 1 ? 1 : r;
}

/* for (i = 0; i < total; i++) { body }, the rows claimed in chunks of row_bytes-sized rows
 * (q_chunk_rows / q_runs / q_claim / q_done): the loop of every claimed-chunk kernel */
#define Q_CLAIMED_ROWS(row_bytes, total, i, ...)                                                      \
    do {                                                                                             \
        q_run q_r_[Q_MAXT];                                                                          \
        int q_cr_ = q_chunk_rows((row_bytes), (total));                                              \
        int q_T_ = q_runs(q_r_, ((total) + q_cr_ - 1) / q_cr_), q_d_ = 0;                            \
        _Pragma("omp parallel")                                                                      \
        {                                                                                            \
            int q_cur_ = omp_get_thread_num() % q_T_;                                                \
            for (int q_c_; (q_c_ = q_claim(q_r_, q_T_, &q_cur_)) >= 0;)                              \
                for (int i = q_c_ * q_cr_; i < (total) && i < (q_c_ + 1) * q_cr_; i++) { __VA_ARGS__ } \
            q_done(&q_d_);                                                                           \
        }                                                                                            \
    } while (0)

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

/* one pass of mt rows through a tile kernel whose row count is a constant (its loops unroll) */
#define I4X16_TILE(tile)                                           \
    switch (mt) {                                                  \
    case 4: tile(xm, K, wb, sb, group, mt, 4, out); break;         \
    case 3: tile(xm, K, wb, sb, group, mt, 3, out); break;         \
    case 2: tile(xm, K, wb, sb, group, mt, 2, out); break;         \
    default: tile(xm, K, wb, sb, group, mt, 1, out); break;        \
    }

/* the M rows of one 16-row block b (MT_MAX activation rows a pass) */
static void i4x16_block(const void *x, int x_bf16, int M, int K, const uint8_t *w, const float *scales, int group,
                        int N, const float *bias, void *y, int y_bf16, int b) {
    int64_t bstride = (int64_t)(K / 8) * 64, sstride = (int64_t)(K / group) * 16;
    const uint8_t *wb = w + b * bstride;
    const float *sb = scales + b * sstride;
    float out[MT_MAX][16];
#ifdef __AVX512BF16__
    if (x_bf16) {
        for (int m0 = 0; m0 < M; m0 += MT_MAX) {
            int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
            const bf16_t *xm = (const bf16_t *)x + (int64_t)m0 * K;
            I4X16_TILE(i4x16_bf16_tile);
            for (int t = 0; t < mt; t++) put16(y, y_bf16, m0 + t, N, b, out[t], bias);
        }
        return;
    }
#endif
#ifdef __AVX512F__
    const int step = MT_MAX;
#else
    const int step = 1; /* the portable loops vectorize differently per row count: one row a pass */
#endif
    for (int m0 = 0; m0 < M; m0 += step) {
        int mt = M - m0 < step ? M - m0 : step;
        const float *xm = (const float *)x + (int64_t)m0 * K;
        I4X16_TILE(i4x16_f32_tile);
        for (int t = 0; t < mt; t++) put16(y, y_bf16, m0 + t, N, b, out[t], bias);
    }
}

/* y[M, N] = x[M, K] @ W^T (+ bias) for int4 x16 weights; K % group == 0, group % 8 == 0. */
int hs_linear_i4x16(const void *x, int x_bf16, int M, int K, const uint8_t *w, const float *scales, int group,
                    int N, const float *bias, void *y, int y_bf16) {
    int nb = (N + 15) / 16;
#ifdef __AVX512BF16__
    int xbf = x_bf16; /* the bf16 kernel reads bf16 x as it is */
#else
    int xbf = 0;
#endif
    const void *xk = xbf ? x : (const void *)hs_x_as_f32(x, x_bf16, (int64_t)M * K);
    if (!xk) return -3; /* out of memory for the float32 copy of x */
    Q_CLAIMED_ROWS((int64_t)(K / 8) * 64, nb, b, i4x16_block(xk, xbf, M, K, w, scales, group, N, bias, y, y_bf16, b););
    return 0;
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
    Q_CLAIMED_ROWS(K, N, n, {
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
    });
}

/* W8A8: xu = xq ^ 0x80 (M K bytes), exact int32 dots less 128 x the row sum */
void hs_linear_w8a8_seq(const int8_t *xq, const uint8_t *xu, const float *xs, int M, int K, const int8_t *w,
                        const float *scale, int N, const float *bias, void *y, int y_bf16, const int32_t *wsum) {
    int kv = K & ~63, pf = qpf();
    Q_CLAIMED_ROWS(K, N, n, {
        const int8_t *wr = w + (int64_t)n * K;
        for (int m = 0; m < M; m++) {
            int32_t a = dot_u8s8(xu + (int64_t)m * K, wr, kv, m == 0 ? pf : 0) - 128 * wsum[n];
            for (int k = kv; k < K; k++) a += (int32_t)xq[(int64_t)m * K + k] * (int32_t)wr[k];
            float v = (float)a * xs[m] * scale[n];
            put(y, (int64_t)m * N + n, bias ? v + bias[n] : v, y_bf16);
        }
    });
}
#endif

/* ---- int8 on AMX tiles, M = 3..16 ----------------------------------------------------- */
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
/* The roles of gemm_amx.c: TDPBSUD's A operand (16 rows x 64 signed bytes) is a block of W as
 * stored (row stride K), its B operand (16 rows of 4-column groups x 16 activation rows x 4
 * unsigned bytes) is an activation byte plane transposed once per call. The product tile is
 * 16 output features x 16 activation rows of exact int32 dots over k < K & ~63: the very
 * integers the VPDPBUSD kernels make, so the outputs are theirs bit for bit (the K tail, the
 * N tail and the final float ops are the one-row code's). np byte planes (2: bf16 x as 16-bit
 * fixed point, 1: W8A8), plane p of activation row m at xb + m * mstride + p * K. */
static __thread uint8_t *bq_buf;
static __thread int64_t bq_cap;

int hs_linear_i8_amx(const uint8_t *xb, int64_t mstride, int np, const int8_t *xq, const float *xs, int M, int K,
                     const int8_t *w, const float *scale, int N, const float *bias, void *y, int y_bf16,
                     const int32_t *wsum) {
    int kv = K & ~63, ns = kv / 64, nb = N / 16, pf = qpf();
    int64_t need = (int64_t)np * ns * 1024;
    if (need > bq_cap) {
        free(bq_buf);
        bq_buf = (uint8_t *)aligned_alloc(64, (size_t)(need > 64 ? need : 64));
        bq_cap = bq_buf ? need : 0; /* (was need even on failure: the next call wrote to NULL) */
        if (!bq_buf) return -3;
    }
    uint8_t *bq = bq_buf;
#pragma omp parallel
    {
        /* B blocks [p][s][quad 0..15][m 0..15][4], zero past M */
#pragma omp for schedule(static)
        for (int ps = 0; ps < np * ns; ps++) {
            int p = ps / ns, s = ps % ns;
            uint32_t *d = (uint32_t *)(bq + (int64_t)ps * 1024);
            for (int q = 0; q < 16; q++)
                for (int m = 0; m < 16; m++) {
                    uint32_t v = 0;
                    if (m < M) memcpy(&v, xb + (int64_t)m * mstride + (int64_t)p * K + s * 64 + q * 4, 4);
                    d[q * 16 + m] = v;
                }
        }
        amx_config_tiles(5);
        int32_t acc[2][16][16];
#pragma omp for schedule(static)
        for (int b = 0; b <= nb; b++) {
            int n0 = b * 16, nr = b < nb ? 16 : N - n0;
            if (nr <= 0) continue;
            if (b < nb) {
                const int8_t *wb = w + (int64_t)n0 * K;
                _tile_zero(3);
                _tile_zero(4);
                for (int s = 0; s < ns; s++) {
                    if (pf)
                        for (int r = 0; r < 16; r++) _mm_prefetch((const char *)(wb + (int64_t)r * K + s * 64) + pf, _MM_HINT_T0);
                    _tile_loadd(0, wb + s * 64, K);
                    _tile_loadd(1, bq + (int64_t)s * 1024, 64);
                    _tile_dpbsud(3, 0, 1);
                    if (np == 2) {
                        _tile_loadd(2, bq + (int64_t)(ns + s) * 1024, 64);
                        _tile_dpbsud(4, 0, 2);
                    }
                }
                _tile_stored(3, acc[0], 64);
                if (np == 2) _tile_stored(4, acc[1], 64);
            } else {
                /* the N tail: the same dots one row at a time */
                for (int i = 0; i < nr; i++)
                    for (int m = 0; m < M; m++) {
                        const uint8_t *x0 = xb + (int64_t)m * mstride;
                        int32_t sl, sh = 0;
                        if (np == 2) dot2_u8s8(x0, x0 + K, w + (int64_t)(n0 + i) * K, kv, 0, &sl, &sh);
                        else sl = dot_u8s8(x0, w + (int64_t)(n0 + i) * K, kv, 0);
                        acc[0][i][m] = sl;
                        acc[1][i][m] = sh;
                    }
            }
            /* the K tail's exact integers, then the float ops of the one-row kernels, in
             * loops over the activation rows that vectorize */
            float vals[16][16];
            for (int i = 0; i < nr; i++) {
                int n = n0 + i;
                const int8_t *wr = w + (int64_t)n * K;
                int64_t l[16], h[16];
                for (int m = 0; m < M; m++) {
                    l[m] = acc[0][i][m];
                    h[m] = np == 2 ? (int64_t)acc[1][i][m] - 128 * (int64_t)wsum[n] : 0;
                }
                for (int k = kv; k < K; k++)
                    for (int m = 0; m < M; m++) {
                        if (np == 2) {
                            l[m] += (int64_t)xb[(int64_t)m * mstride + k] * wr[k];
                            h[m] += (int64_t)((int)xb[(int64_t)m * mstride + K + k] - 128) * wr[k];
                        } else {
                            l[m] += (int64_t)xq[(int64_t)m * K + k] * wr[k];
                        }
                    }
                float sc = scale[n], bn = bias ? bias[n] : 0.f;
                if (np == 2) {
                    for (int m = 0; m < M; m++) {
                        double dot = 256.0 * (double)h[m] + (double)l[m];
                        vals[m][i] = (float)(dot * xs[m]) * sc;
                    }
                } else {
                    /* W8A8's dot is an int32 (wsum's 128 x removed once: l holds acc + tail) */
                    for (int m = 0; m < M; m++)
                        vals[m][i] = (float)(int32_t)(l[m] - 128 * (int64_t)wsum[n]) * xs[m] * sc;
                }
                if (bias)
                    for (int m = 0; m < M; m++) vals[m][i] += bn;
            }
            for (int m = 0; m < M; m++) {
                if (y_bf16)
                    for (int i = 0; i < nr; i++) ((bf16_t *)y)[(int64_t)m * N + n0 + i] = f32_to_bf16(vals[m][i]);
                else
                    memcpy((float *)y + (int64_t)m * N + n0, vals[m], (size_t)nr * 4);
            }
        }
        _tile_release();
    }
    return 0;
}
#endif
