/* Paged causal GQA attention over kv cache [2][blocks][bs][Hk][D].
 *
 * The group of query heads sharing a kv head is done together, so each key and value row is
 * read once for all of them. Decode rows (a sequence with one query token) split their keys
 * into fixed spans of SPAN positions counted from position 0, so batch 1 fills every core;
 * the spans' partial softmax states are merged in span order. A decode work item is one
 * row's span for one kv head or, with rows enough to fill the cores, for all of them.
 * Prefill rows take their whole key range in one item per kv head (there are tokens enough
 * to fill the cores). A row's arithmetic depends only on its own context, never on the
 * batch: batch-invariant by construction. */
#include "common.h"
#include <omp.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* s[j] = exp(s[j] - mx) in place for j < n (every s[j] <= mx), returning their sum. libm's
 * expf is scalar and a decode's softmax calls it Hq x context times a layer; the AVX-512
 * path is exp(x) = 2^k * 2^f, k = round(x log2 e), 2^f by Cephes' exp2f polynomial on
 * [-0.5, 0.5] (about 2 ulp), 2^k by VSCALEFPS. Lanes and tail depend only on n. */
static inline float exp_shift_sum(float *s, int n, float mx) {
    float sum = 0.f;
    int j = 0;
#ifdef __AVX512F__
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), lo = _mm512_set1_ps(-87.3f);
    const __m512 c6 = _mm512_set1_ps(1.535336188319500e-4f), c5 = _mm512_set1_ps(1.339887440266574e-3f),
                 c4 = _mm512_set1_ps(9.618437357674640e-3f), c3 = _mm512_set1_ps(5.550332471162809e-2f),
                 c2 = _mm512_set1_ps(2.402264791363012e-1f), c1 = _mm512_set1_ps(6.931472028550421e-1f),
                 one = _mm512_set1_ps(1.f), m = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), m), lo);
        __m512 t = _mm512_mul_ps(x, log2e);
        __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 f = _mm512_sub_ps(t, k);
        __m512 p = _mm512_fmadd_ps(c6, f, c5);
        p = _mm512_fmadd_ps(p, f, c4);
        p = _mm512_fmadd_ps(p, f, c3);
        p = _mm512_fmadd_ps(p, f, c2);
        p = _mm512_fmadd_ps(p, f, c1);
        p = _mm512_fmadd_ps(p, f, one);
        __m512 e = _mm512_scalef_ps(p, k);
        _mm512_storeu_ps(s + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; j < n; j++) {
        float e = expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    return sum;
}

/* keys per decode span. 256 (128 until 2026-12-05): a batched decode's rows sit a little past
 * a multiple of 128 (a 128-token prompt and its first tokens), and a span of a few keys cost
 * a good part of a full one; this 2-vCPU box, `bench/cpu_attention.py --threads 1 --layers 1
 * --ctx 136` (32 rows x 136 keys): 0.64-0.66 ms with 128, 0.57-0.60 with 256 (tests/hal:
 * every span count and merge path is exercised at either size). */
#define SPAN 256
/* below this many multiply-adds (QK^T + PV) a call of few rows runs on the calling thread:
 * waking sleeping workers (OMP_WAIT_POLICY=PASSIVE) costs more than such a call's work */
#define PAR_WORK (1 << 20)

#ifdef __AVX512F__
/* out[j] = q . k[j] for 16 rows k[j] = k + j * D (D % 16 == 0): 16 dot products in one pass,
 * their 16 partial vectors summed by a transpose-add tree (level l adds pairs of lanes
 * 2^l apart), so one vector op does 16 keys' reduction instead of 16 horizontal sums. */
static inline __m512 dot16(const float *q, const float *k, int D) {
    __m512 a[16];
    for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
        __m512 qv = _mm512_loadu_ps(q + d);
        for (int j = 0; j < 16; j++) a[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + (int64_t)j * D + d), a[j]);
    }
    __m512 c[8], e[4];
    for (int i = 0; i < 8; i++)
        c[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(c[2 * i]), y = _mm512_castps_pd(c[2 * i + 1]);
        e[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 f = _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xdd));
    __m512 g = _mm512_add_ps(_mm512_shuffle_f32x4(e[2], e[3], 0x88), _mm512_shuffle_f32x4(e[2], e[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(f, g, 0x88), _mm512_shuffle_f32x4(f, g, 0xdd));
}
#endif

typedef struct {
    const void *kc, *vc;
    const int32_t *tables;
    int max_blocks, Hk, D, bs, group, bf16, qbf16;
    float scale;
    int *oom; /* set when a worker's scratch could not be had: hs_attention returns -3 */
} attn_ctx;

/* a span whose scratch could not be had: an empty state, the call reported out of memory */
static void span_oom(const attn_ctx *c, float *m, float *l, float *acc) {
    __atomic_store_n(c->oom, 1, __ATOMIC_RELAXED);
    for (int g = 0; g < c->group; g++) m[g] = -INFINITY, l[g] = 0.f;
    memset(acc, 0, (size_t)c->group * c->D * 4);
}

/* a worker's scratch for span(): one allocation per thread, grown, never shrunk (a malloc and
 * free of ~40 KB per work item cost as much as a short span's arithmetic) */
static __thread float *scratch;
static __thread size_t scratch_cap;
static float *span_scratch(size_t bytes) {
    if (bytes > scratch_cap) {
        free(scratch);
        scratch = (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
        scratch_cap = scratch ? bytes : 0;
    }
    return scratch;
}

/* online softmax over keys [kbeg, kend) of one sequence for one kv head:
 * q [group][D] fp32 -> m [group], l [group], acc [group][D] (unnormalised).
 * Each key and value row is converted once and used by every head of the group. */
static void span(const attn_ctx *c, const int32_t *table, int h, const float *q, int kbeg, int kend,
                 float *m, float *l, float *acc) {
    int G = c->group, D = c->D;
    float *s = span_scratch(((size_t)G * SPAN + 2 * (size_t)D + (size_t)SPAN * D) * 4);
    if (!s) {
        span_oom(c, m, l, acc);
        return;
    }
    float *row = s + (size_t)G * SPAN, *keys = row + 2 * (size_t)D;
    float mx[G];
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
        for (int i = 0; i < D; i++) acc[g * D + i] = 0.f;
    }
    for (int b0 = kbeg; b0 < kend; b0 += SPAN) {
        int n = kend - b0 < SPAN ? kend - b0 : SPAN;
        for (int g = 0; g < G; g++) mx[g] = m[g];
        /* the span's keys once in fp32 [n][D], then every head of the group against them */
        for (int j = 0; j < n; j++) {
            int p = b0 + j;
            int64_t off = (((int64_t)table[p / c->bs] * c->bs + p % c->bs) * c->Hk + h) * D;
            row_to_f32(c->kc, off, D, c->bf16, keys + (size_t)j * D);
        }
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float *sg = s + g * SPAN;
            int j = 0;
#ifdef __AVX512F__
            if (D % 16 == 0) {
                __m512 sc = _mm512_set1_ps(c->scale), mv = _mm512_set1_ps(-INFINITY);
                for (; j + 16 <= n; j += 16) {
                    __m512 d = _mm512_mul_ps(dot16(qg, keys + (size_t)j * D, D), sc);
                    _mm512_storeu_ps(sg + j, d);
                    mv = _mm512_max_ps(mv, d);
                }
                mx[g] = fmaxf(mx[g], _mm512_reduce_max_ps(mv));
            }
#endif
            for (; j < n; j++) {
                const float *kr = keys + (size_t)j * D;
                float d = 0.f;
#pragma omp simd reduction(+ : d)
                for (int i = 0; i < D; i++) d += qg[i] * kr[i];
                d *= c->scale;
                sg[j] = d;
                mx[g] = fmaxf(mx[g], d);
            }
        }
        for (int g = 0; g < G; g++) {
            float corr = m[g] == -INFINITY ? 0.f : expf(m[g] - mx[g]);
            float *ag = acc + g * D;
            for (int i = 0; i < D; i++) ag[i] *= corr;
            m[g] = mx[g];
            l[g] = l[g] * corr + exp_shift_sum(s + g * SPAN, n, mx[g]);
        }
#ifdef __AVX512F__
        if (D % 16 == 0) {
            /* values once in fp32 [n][D] (over the keys, done with), then per 16 columns
             * up to 8 heads' accumulators stay in registers across the span's rows */
            for (int j = 0; j < n; j++) {
                int p = b0 + j;
                int64_t off = (((int64_t)table[p / c->bs] * c->bs + p % c->bs) * c->Hk + h) * D;
                row_to_f32(c->vc, off, D, c->bf16, keys + (size_t)j * D);
            }
            for (int g0 = 0; g0 < G; g0 += 8) {
                int gn = G - g0 < 8 ? G - g0 : 8;
                for (int d = 0; d < D; d += 16) {
                    __m512 a[8];
                    for (int gi = 0; gi < 8; gi++)
                        a[gi] = gi < gn ? _mm512_loadu_ps(acc + (g0 + gi) * D + d) : _mm512_setzero_ps();
                    for (int j = 0; j < n; j++) {
                        __m512 v = _mm512_loadu_ps(keys + (size_t)j * D + d);
                        for (int gi = 0; gi < 8; gi++)
                            if (gi < gn) a[gi] = _mm512_fmadd_ps(_mm512_set1_ps(s[(g0 + gi) * SPAN + j]), v, a[gi]);
                    }
                    for (int gi = 0; gi < gn; gi++) _mm512_storeu_ps(acc + (g0 + gi) * D + d, a[gi]);
                }
            }
            continue;
        }
#endif
        for (int j = 0; j < n; j++) {
            int p = b0 + j;
            int64_t off = (((int64_t)table[p / c->bs] * c->bs + p % c->bs) * c->Hk + h) * D;
            row_to_f32(c->vc, off, D, c->bf16, row);
            for (int g = 0; g < G; g++) {
                float e = s[g * SPAN + j], *ag = acc + g * D;
#pragma omp simd
                for (int i = 0; i < D; i++) ag[i] += e * row[i];
            }
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* The same span on AMX tiles, for bf16 queries and cache (D % 32 == 0, a group of <= 16
 * heads, 16-key tiles inside one cache block): a decode row's span is 8 heads x <= SPAN keys x
 * D, many thousand cycles of AVX-512 FMAs but a few dozen tile products. Scores: one tile
 * of 16 keys x 16 heads = K (16 rows at the cache's key stride, as stored) times q^T in the
 * pair layout (packed once a span_amx call: one kv head). Softmax as span() does, per head
 * (tile columns gathered into rows). P V: P's rows (heads) as the A tile, split into bf16 hi + lo (P = hi + lo to
 * ~2^-16, so the weights are not rounded to bf16), V as key pairs x 16 columns (two key
 * rows interleaved). Keys past the span's end are zero in P and V (a cache block's unused
 * rows may hold anything, NaN included). Each row's arithmetic depends only on its own keys. */
#include <immintrin.h>
static int attn_amx = 1;
void hs_set_attn_amx(int on) { attn_amx = on != 0; }
/* a thread's tiles are configured once per hs_attention call (LDTILECFG took ~10% of a short
 * span's time when each item configured and released them), released at the region's end */
static __thread int tiles_on;
static inline void tiles_release(void) {
    if (tiles_on) {
        _tile_release();
        tiles_on = 0;
    }
}

#define ACC_TILES 4 /* tiles 0..3: 4 x 16 output columns per pass over the span's keys */
#define QK_STEP(T, K, U)                                                                 \
    if (U < nq) {                                                                        \
        _tile_loadd(K, kr[U] + kk * 32, kstride * 2);                                    \
        _tile_dpbf16ps(T, K, 6);                                                         \
    }
#define PV_STEP(T, V, DT)                                                                \
    if (DT < ndt) {                                                                      \
        _tile_loadd(V, vb + ((int64_t)kc * nd16 + dt0 + DT) * 256, 64);                  \
        _tile_dpbf16ps(T, 5, V);                                                         \
        _tile_dpbf16ps(T, 7, V);                                                         \
    }
/* V rows [32 kc2, 32 kc2 + 32) of a span (key j at vc + koff[j / 16] + (j % 16) kstride) as key
 * pairs, the PV tiles' B operand: vb[kc2][dt][r][c] = (v[2r][16 dt + c], v[2r + 1][16 dt + c]), zero
 * past the span's n keys; one VPERMT2W per 16 columns */
static inline void vpack(const bf16_t *vc, const int64_t *koff, int64_t kstride, int n, int D, int kc2, uint32_t *vb) {
    const __m512i ilo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                         5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0),
                  ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
    int nd16 = D / 16;
    for (int r = 0; r < 16; r++) {
        int j0 = kc2 * 32 + 2 * r;
        const bf16_t *va = NULL, *vb2 = NULL;
        if (j0 < n) va = vc + koff[j0 >> 4] + (j0 & 15) * kstride;
        if (j0 + 1 < n) vb2 = va + kstride; /* j0 even: the same 16-key group */
        uint32_t *dst = vb + (int64_t)kc2 * nd16 * 256 + r * 16;
        for (int hh = 0; hh < D / 32; hh++) {
            __m512i a = va ? _mm512_loadu_si512((const void *)(va + hh * 32)) : _mm512_setzero_si512();
            __m512i b = vb2 ? _mm512_loadu_si512((const void *)(vb2 + hh * 32)) : _mm512_setzero_si512();
            _mm512_storeu_si512((void *)(dst + (2 * hh) * 256), _mm512_permutex2var_epi16(a, ilo, b));
            _mm512_storeu_si512((void *)(dst + (2 * hh + 1) * 256), _mm512_permutex2var_epi16(a, ihi, b));
        }
    }
}

static void span_amx(const attn_ctx *c, const int32_t *table, int h, const bf16_t *q, int kbeg, int kend, float *m,
                     float *l, float *acc) {
    int G = c->group, D = c->D, nk = D / 32, nd16 = D / 16, bs = c->bs;
    int64_t kstride = (int64_t)c->Hk * D; /* elements between consecutive keys of a block */
    /* scratch: q^T pairs [nk][16][16] u32, scores [16 heads][SPAN] f32, tile out [16][16] f32,
     * P hi/lo [16][SPAN] bf16, V pairs [SPAN/32][nd16][16][16] u32 */
    size_t qb_n = (size_t)nk * 256, sc_n = 16 * (size_t)SPAN, t_n = 256, p_n = 16 * (size_t)SPAN / 2,
           vb_n = (size_t)(SPAN / 32) * nd16 * 256;
    uint32_t *qb = (uint32_t *)span_scratch((qb_n + sc_n + t_n + 2 * p_n + vb_n) * 4);
    if (!qb) {
        span_oom(c, m, l, acc);
        return;
    }
    float *s = (float *)(qb + qb_n), *to = s + sc_n;
    bf16_t *ph = (bf16_t *)(to + t_n), *pl = ph + 16 * SPAN;
    uint32_t *vb = (uint32_t *)(pl + 16 * SPAN);
    const uint32_t *q32 = (const uint32_t *)q;
    /* q^T pairs: lane g of row r of step kk is head g's pair kk * 16 + r (zero past G) */
    const __mmask16 gm = (__mmask16)((1u << G) - 1u);
    const __m512i qidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(D / 2));
    for (int kk = 0; kk < nk; kk++)
        for (int r = 0; r < 16; r++)
            _mm512_storeu_si512((void *)(qb + kk * 256 + r * 16),
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), gm, qidx, q32 + kk * 16 + r, 4));
    /* P's rows G..15 stay zero (rows < G are written up to each span's 32-key step, all PV reads) */
    memset(ph + G * SPAN, 0, (size_t)(16 - G) * SPAN * 2);
    memset(pl + G * SPAN, 0, (size_t)(16 - G) * SPAN * 2);
    float mx[16], corr[16];
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
        for (int i = 0; i < D; i++) acc[g * D + i] = 0.f;
    }
    if (!tiles_on) {
        amx_config_tiles(8);
        tiles_on = 1;
    }
    const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
    const __m512 sc = _mm512_set1_ps(c->scale);
    const bf16_t *kc = (const bf16_t *)c->kc, *vc = (const bf16_t *)c->vc;
    for (int b0 = kbeg; b0 < kend; b0 += SPAN) {
        int n = kend - b0 < SPAN ? kend - b0 : SPAN, nt = (n + 15) / 16, n32 = (n + 31) / 32;
        /* element offset of each 16-key group's first key (b0 % 16 == 0 and bs % 16 == 0: a
         * group never crosses a cache block); key j of group t is at + (j % 16) * kstride */
        int64_t koff[SPAN / 16];
        for (int t = 0; t < nt; t++) {
            int p = b0 + t * 16;
            koff[t] = (((int64_t)table[p / bs] * bs + p % bs) * c->Hk + h) * D;
        }
        __m512 mxv[16]; /* per head, the lane-wise max of its scores so far in this span */
        for (int g = 0; g < G; g++) mxv[g] = _mm512_set1_ps(-INFINITY);
        /* scores, 4 key tiles at a time: 4 independent accumulator chains (tiles 0..3) */
        for (int t0 = 0; t0 < nt; t0 += 4) {
            int nq = nt - t0 < 4 ? nt - t0 : 4;
            const bf16_t *kr[4];
            for (int u = 0; u < nq; u++) kr[u] = kc + koff[t0 + u];
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int kk = 0; kk < nk; kk++) {
                _tile_loadd(6, qb + kk * 256, 64);
                QK_STEP(0, 5, 0)
                QK_STEP(1, 7, 1)
                QK_STEP(2, 5, 2)
                QK_STEP(3, 7, 3)
            }
            for (int u = 0; u < nq; u++) {
                AMX_STORE_ACC(u, to)
                int tt = t0 + u, valid = n - tt * 16 < 16 ? n - tt * 16 : 16;
                __mmask16 k = (__mmask16)((1u << valid) - 1u);
                for (int g = 0; g < G; g++) {
                    /* column g of the tile: head g's scores of the 16 keys */
                    __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(col, to + g, 4), sc);
                    _mm512_mask_storeu_ps(s + g * SPAN + tt * 16, k, v);
                    mxv[g] = _mm512_mask_max_ps(mxv[g], k, mxv[g], v);
                }
            }
        }
        for (int g = 0; g < G; g++) mx[g] = fmaxf(m[g], _mm512_reduce_max_ps(mxv[g]));
        for (int g = 0; g < G; g++) {
            corr[g] = m[g] == -INFINITY ? 0.f : expf(m[g] - mx[g]);
            m[g] = mx[g];
            l[g] = l[g] * corr[g] + exp_shift_sum(s + g * SPAN, n, mx[g]);
            /* P's row g as bf16 hi + lo, zero past n up to the 32-key step */
            for (int j = 0; j < n32 * 32; j += 16) {
                int left = n - j;
                __mmask16 k = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1u) : 0;
                __m512 v = _mm512_maskz_loadu_ps(k, s + g * SPAN + j);
                __m256i hi = hs_bf16x16_round(v);
                __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16)));
                _mm256_storeu_si256((__m256i *)(ph + g * SPAN + j), hi);
                _mm256_storeu_si256((__m256i *)(pl + g * SPAN + j), hs_bf16x16_round(rest));
            }
        }
        for (int kc2 = 0; kc2 < n32; kc2++) vpack(vc, koff, kstride, n, D, kc2, vb);
        for (int dt0 = 0; dt0 < nd16; dt0 += ACC_TILES) {
            int ndt = nd16 - dt0 < ACC_TILES ? nd16 - dt0 : ACC_TILES;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int kc = 0; kc < n32; kc++) {
                _tile_loadd(5, ph + kc * 32, SPAN * 2);
                _tile_loadd(7, pl + kc * 32, SPAN * 2);
                PV_STEP(0, 6, 0)
                PV_STEP(1, 4, 1)
                PV_STEP(2, 6, 2)
                PV_STEP(3, 4, 3)
            }
            for (int dt = 0; dt < ndt; dt++) {
                AMX_STORE_ACC(dt, to)
                for (int g = 0; g < G; g++) {
                    float *ag = acc + g * D + (dt0 + dt) * 16;
                    _mm512_storeu_ps(ag, _mm512_fmadd_ps(_mm512_loadu_ps(ag), _mm512_set1_ps(corr[g]),
                                                         _mm512_loadu_ps(to + g * 16)));
                }
            }
        }
    }
}
#else
void hs_set_attn_amx(int on) { (void)on; }
static inline void tiles_release(void) {}
#endif

/* span() for kv head h's query heads (q's G rows from element qoff): on AMX tiles where they
 * serve (bf16 q and cache; fixed per model, so a row takes the same path whatever else is in
 * the batch), else the AVX-512 / scalar one on q in float32 */
static void span_any(const attn_ctx *c, const int32_t *table, int h, const void *q, int64_t qoff, int kbeg,
                     int kend, float *m, float *l, float *acc) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (attn_amx && c->bf16 && c->qbf16 && c->D % 32 == 0 && c->D <= 256 && c->group <= 16 && c->bs % 16 == 0 &&
        kbeg % 16 == 0) {
        span_amx(c, table, h, (const bf16_t *)q + qoff, kbeg, kend, m, l, acc);
        return;
    }
#endif
    float qf[c->group * c->D];
    row_to_f32(q, qoff, c->group * c->D, c->qbf16, qf);
    span(c, table, h, qf, kbeg, kend, m, l, acc);
}

/* per-token facts: sequence, absolute position, first visible key */
static void token_map(const int32_t *cu_q, const int32_t *seq_lens, int num_seqs, int window,
                      int32_t *tok_seq, int32_t *tok_pos, int32_t *tok_beg) {
    for (int i = 0; i < num_seqs; i++) {
        int q0 = cu_q[i], q1 = cu_q[i + 1], slen = seq_lens[i];
        for (int t = q0; t < q1; t++) {
            int p = slen - (q1 - t);
            tok_seq[t] = i;
            tok_pos[t] = p;
            tok_beg[t] = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        }
    }
}

static void write_norm(const attn_ctx *c, void *out, int64_t t, int Hq, int h, const float *l,
                       const float *acc) {
    int G = c->group, D = c->D;
    float o[D];
    for (int g = 0; g < G; g++) {
        float inv = l[g] > 0.f ? 1.0f / l[g] : 0.f;
        for (int i = 0; i < D; i++) o[i] = acc[g * D + i] * inv;
        row_from_f32(out, (t * Hq + h * G + g) * D, D, c->qbf16, o);
    }
}

/* Prefill rows through the decode rows' spans (0: one pass over their keys; 1 in
 * batch-invariant mode: hs_attention's prefill_spans, which the backend passes each call, so
 * two backends in one process, on two threads, never see each other's; -1 there reads this
 * switch, for A/B timing). On, a token's bits do not depend on whether it ran as a decode row or inside a prefill
 * chunk (batch-invariant mode's chunking and preemption: tests/engine/test_bi_chunking.py): both
 * compute the same SPAN-key spans from fresh states (span_item) and merge them with one function
 * (merge_write). Costs a partial state per span and a merge for each prefill token. */
static int attn_prefill_spans = 0;
void hs_set_attn_prefill_spans(int on) { attn_prefill_spans = on != 0; }
static __thread float *pscratch;
static __thread size_t pscratch_cap;

/* span sp's partial state (m [G], l [G], acc [G][D] at pm) of the token at position pos whose
 * first visible key is beg: keys [sp * SPAN, sp * SPAN + SPAN) clipped to [beg, pos] */
static void span_item(const attn_ctx *c, const int32_t *table, int h, const void *q, int64_t qoff, int sp, int beg,
                      int pos, float *pm) {
    int G = c->group;
    float *pl = pm + G, *pa = pl + G;
    int s0 = sp * SPAN, s1 = s0 + SPAN;
    if (s0 < beg) s0 = beg;
    if (s1 > pos + 1) s1 = pos + 1;
    if (s0 >= s1) {
        for (int g = 0; g < G; g++) pm[g] = -INFINITY, pl[g] = 0.f;
        return;
    }
    span_any(c, table, h, q, qoff, s0, s1, pm, pl, pa);
}

/* a token's nsp span states (stride per floats) merged in span order and written out; one
 * function (not inlined) for decode and prefill rows, so both round alike */
static __attribute__((noinline)) void merge_write(const attn_ctx *c, void *out, int64_t t, int Hq, int h,
                                                  const float *p0, int nsp, size_t per) {
    int G = c->group, D = c->D;
    float L[G], o[G * D];
    for (int g = 0; g < G; g++) {
        float M = -INFINITY;
        for (int sp = 0; sp < nsp; sp++) M = fmaxf(M, p0[sp * per + g]);
        L[g] = 0.f;
        for (int i = 0; i < D; i++) o[g * D + i] = 0.f;
        for (int sp = 0; sp < nsp; sp++) {
            const float *pm = p0 + sp * per;
            if (pm[g] == -INFINITY) continue;
            float w = expf(pm[g] - M);
            L[g] += w * pm[G + g];
            const float *pa = pm + 2 * G + g * D;
            for (int i = 0; i < D; i++) o[g * D + i] += w * pa[i];
        }
    }
    write_norm(c, out, t, Hq, h, L, o);
}

/* The caller's indices, before anything is read through them: 0, or 1 + 4 * seq + what for
 * the first bad sequence, what = 0: cu_seqlens_q does not start at 0, decreases or passes the
 * T query rows; 1: a context shorter than its query; 2: a context past its block table's
 * max_blocks * bs keys; 3: a block id the query reads outside [0, num_blocks). Only the blocks
 * a query reads are checked (a sliding window's evicted ones are not): one compare a block. */
static int check_indices(const int32_t *cu_q, const int32_t *seq_lens, const int32_t *tables, int max_blocks,
                         int num_seqs, int T, int bs, int window, int num_blocks) {
    if (num_seqs > 0 && cu_q[0] != 0) return 1;
    for (int i = 0; i < num_seqs; i++) {
        int q0 = cu_q[i], q1 = cu_q[i + 1], slen = seq_lens[i];
        if (q1 < q0 || q1 > T) return 1 + 4 * i;
        if (slen < q1 - q0) return 2 + 4 * i;
        if (q1 == q0) continue; /* no query row: nothing read */
        if ((int64_t)slen > (int64_t)max_blocks * bs) return 3 + 4 * i;
        int p0 = slen - (q1 - q0), beg = window > 0 && p0 - window + 1 > 0 ? p0 - window + 1 : 0;
        const int32_t *tb = tables + (int64_t)i * max_blocks;
        for (int b = beg / bs; b <= (slen - 1) / bs; b++)
            if ((uint32_t)tb[b] >= (uint32_t)num_blocks) return 4 + 4 * i;
    }
    return 0;
}

/* Returns 0, -3 out of memory, or check_indices' code (> 0: nothing computed, out untouched). */
int hs_attention(const void *q, const void *kc, const void *vc, void *out, const int32_t *cu_q,
                  const int32_t *seq_lens, const int32_t *tables, int max_blocks, int num_seqs,
                  int T, int Hq, int Hk, int D, int bs, int window, float scale, int qbf16,
                  int max_seqlen_k, int bf16, int prefill_spans, int num_blocks) {
    int bad = check_indices(cu_q, seq_lens, tables, max_blocks, num_seqs, T, bs, window, num_blocks);
    if (bad) return bad;
    int oom = 0, spans = prefill_spans < 0 ? attn_prefill_spans : prefill_spans != 0;
    attn_ctx c = {kc, vc, tables, max_blocks, Hk, D, bs, Hq / Hk, bf16, qbf16, scale, &oom};
    int G = Hq / Hk;
    int32_t *tok = (int32_t *)malloc((size_t)T * 3 * 4 + 4);
    int32_t *dec = (int32_t *)malloc((size_t)T * 4 + 4), *pre = (int32_t *)malloc((size_t)T * 4 + 4);
    if (!tok || !dec || !pre) {
        free(tok), free(dec), free(pre);
        return -3;
    }
    int32_t *tok_seq = tok, *tok_pos = tok + T, *tok_beg = tok + 2 * T;
    token_map(cu_q, seq_lens, num_seqs, window, tok_seq, tok_pos, tok_beg);
    int nd = 0, np = 0, qend = num_seqs > 0 ? cu_q[num_seqs] : 0;
    /* query rows past the last sequence's (a padded graph's spare rows) belong to no sequence:
     * they read nothing and come out zero */
    float zero[D];
    for (int i = 0; i < D; i++) zero[i] = 0.f;
    for (int t = qend < 0 ? 0 : qend; t < T; t++)
        for (int h = 0; h < Hq; h++) row_from_f32(out, ((int64_t)t * Hq + h) * D, D, qbf16, zero);
    for (int t = 0; t < T && t < qend; t++) {
        int i = tok_seq[t];
        if (cu_q[i + 1] - cu_q[i] == 1) dec[nd++] = t;
        else pre[np++] = t;
    }
    /* decode row d's items are [first[d], first[d + 1]): its kv heads x the spans up to its
     * own position (a bound like max_model_len, which a captured step passes, would add
     * empty items; a longer row adds no work to a shorter one) */
    size_t per = (size_t)G * (D + 2);
    int64_t *first = (int64_t *)malloc(((size_t)nd + 1) * 8);
    if (!first) {
        free(tok), free(dec), free(pre);
        return -3;
    }
    first[0] = 0;
    for (int d = 0; d < nd; d++) {
        int nsp = (tok_pos[dec[d]] + SPAN) / SPAN;
        first[d + 1] = first[d] + (int64_t)Hk * nsp;
    }
    int64_t states = first[nd];
    /* A work item is one row's span for hpi kv heads: all of them where the rows' spans alone
     * give every thread 4 items or more (each item then reads whole cache blocks, all heads'
     * keys side by side, one sequential run; per head a D x 2-byte row in every Hk x D x 2 bytes),
     * else one head (batch 1 fills the cores). Which heads share an item never changes a
     * head's arithmetic. */
    int hpi = (states / Hk >= 4 * (int64_t)omp_get_max_threads()) ? Hk : 1;
    int64_t items = states / hpi; /* row d's items: [first[d] / hpi, first[d + 1] / hpi) */
    float *part = (float *)malloc((size_t)(states > 0 ? states : 1) * per * 4);
    if (!part) { /* the decode rows' span states: a long context for many rows */
        free(first), free(tok), free(dec), free(pre);
        return -3;
    }
    int64_t work = (int64_t)T * Hq * (max_seqlen_k > 0 ? max_seqlen_k : 1) * D * 2;
#pragma omp parallel if ((hs_small_par && work >= PAR_WORK) || T >= 8)
    {
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t it = 0; it < items; it++) {
            int lo = 0, hi = nd - 1; /* the decode row holding item it */
            while (lo < hi) {
                int mid = (lo + hi + 1) / 2;
                if (first[mid] / hpi <= it) lo = mid;
                else hi = mid - 1;
            }
            int nsp = (int)((first[lo + 1] - first[lo]) / Hk);
            int64_t k = it - first[lo] / hpi; /* head group k / nsp, span k % nsp */
            int sp = (int)(k % nsp), h0 = (int)(k / nsp) * hpi;
            int t = dec[lo], i = tok_seq[t];
            for (int h = h0; h < h0 + hpi; h++)
                span_item(&c, tables + (int64_t)i * max_blocks, h, q, ((int64_t)t * Hq + h * G) * D, sp, tok_beg[t],
                          tok_pos[t], part + (first[lo] + (int64_t)h * nsp + sp) * per);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < (int64_t)np * Hk; it++) {
            int h = (int)(it % Hk), t = pre[it / Hk], i = tok_seq[t];
            const int32_t *table = tables + (int64_t)i * max_blocks;
            int64_t qoff = ((int64_t)t * Hq + h * G) * D;
            if (spans) {
                int nsp = (tok_pos[t] + SPAN) / SPAN;
                size_t need = (size_t)nsp * per * 4;
                if (need > pscratch_cap) {
                    free(pscratch);
                    pscratch = (float *)malloc(need);
                    pscratch_cap = pscratch ? need : 0;
                    if (!pscratch) {
                        __atomic_store_n(&oom, 1, __ATOMIC_RELAXED);
                        continue;
                    }
                }
                for (int sp = 0; sp < nsp; sp++)
                    span_item(&c, table, h, q, qoff, sp, tok_beg[t], tok_pos[t], pscratch + sp * per);
                merge_write(&c, out, t, Hq, h, pscratch, nsp, per);
                continue;
            }
            float ml[2 * G], acc[G * D];
            span_any(&c, table, h, q, qoff, tok_beg[t], tok_pos[t] + 1, ml, ml + G, acc);
            write_norm(&c, out, t, Hq, h, ml + G, acc);
        }
        /* merge each decode row's spans in span order */
#pragma omp for schedule(static)
        for (int64_t th = 0; th < (int64_t)nd * Hk; th++) {
            int d = (int)(th / Hk), t = dec[d], h = (int)(th % Hk);
            int nsp = (int)((first[d + 1] - first[d]) / Hk);
            merge_write(&c, out, t, Hq, h, part + (first[d] + (int64_t)h * nsp) * per, nsp, per);
        }
        tiles_release();
    }
    free(part);
    free(first);
    free(dec);
    free(pre);
    free(tok);
    return oom ? -3 : 0;
}
