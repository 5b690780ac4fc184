/* sample: greedy argmax, or a seeded Gumbel-max draw over the temperature-scaled logits left
 * by top-k / top-p / min-p, the math of halserve.hal.sampling (sampling_mask, sample_random)
 * with the noise of halserve.hal.rng.counter_uniform bit for bit, so a seeded row draws the
 * token native draws (up to the last-ulp differences of libm's expf/logf against torch's).
 *
 * Work: rows over the pool at batch > 1; at batch 1 the vocabulary-wide passes (argmax, the
 * unfiltered draw) split into chunks over the pool once the vocabulary is large enough to pay
 * for waking it. A chunk's best is (value, lowest index); merging chunks in order gives the
 * first maximum, as torch.argmax does, whatever the split. top-k / top-p never sort the whole
 * vocabulary: top-k keeps a k-entry heap, top-p sorts only the tokens within a logit margin of
 * the best whose mass already exceeds p (everything below them is past the nucleus). */
#include "common.h"
#include <stdlib.h>
#include <omp.h>

#define F_ALL_GREEDY 1
#define F_ALL_RANDOM 2
#define F_NO_TOP_K 4
#define F_NO_TOP_P 8
#define F_NO_MIN_P 16

#define ARGMAX_PAR_MIN (1 << 18) /* batch-1 vocabulary from which an argmax splits over the pool */
#define DRAW_PAR_MIN 65536 /* ... and an unfiltered draw (~2 ns a token vectorized) */
#define ROWS_PAR_MIN 32768   /* batch x vocabulary from which rows go to the pool */

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

static inline uint32_t row_hash(int64_t seed, int64_t step) {
    uint64_t sd = (uint64_t)seed, st = (uint64_t)step;
    uint32_t h = mix32((uint32_t)sd ^ 0x9E3779B9u);
    h = mix32(h ^ (uint32_t)(sd >> 32));
    h = mix32(h ^ (uint32_t)st ^ 0x85EBCA6Bu);
    return mix32(h ^ (uint32_t)(st >> 32));
}

/* -log(-log(u)), u the column's uniform in (0, 1): odd multiples of 2^-24 */
static inline float gumbel(uint32_t h, uint32_t col) {
    uint32_t x = mix32(h ^ mix32(col ^ 0x27D4EB2Fu));
    x = mix32(x ^ h);
    float u = (float)((x >> 9) * 2u + 1u) * (1.0f / 16777216.0f);
    return -logf(-logf(u));
}

typedef struct { float v; int64_t i; } best_t;

/* a before b in the draw / argmax order: larger value, then lower index */
static inline int ahead(float av, int64_t ai, float bv, int64_t bi) {
    return av > bv || (av == bv && ai < bi);
}

/* first maximum of v[i0:i1); NaN counts as the largest (torch.argmax) */
static best_t argmax_span(const float *v, int64_t i0, int64_t i1) {
    best_t b = {-INFINITY, i0};
    int64_t i = i0;
#ifdef __AVX512F__
    if (i1 - i0 >= 64) {
        __m512 mx = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (; i + 16 <= i1; i += 16) {
            __m512 x = _mm512_loadu_ps(v + i);
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            mx = _mm512_max_ps(mx, x);
        }
        float m = _mm512_reduce_max_ps(mx);
        for (int64_t j = i; j < i1; j++) {
            if (v[j] != v[j]) nan = 1;
            else if (v[j] > m) m = v[j];
        }
        int64_t j = i0;
        for (; j + 16 <= i1; j += 16) {  /* the first lane holding it */
            __m512 x = _mm512_loadu_ps(v + j);
            __mmask16 hit = nan ? _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q)
                                : _mm512_cmp_ps_mask(x, _mm512_set1_ps(m), _CMP_EQ_OQ);
            if (hit) {
                j += __builtin_ctz((unsigned)hit);
                b.v = v[j];
                b.i = j;
                return b;
            }
        }
        for (; j < i1; j++)
            if (nan ? v[j] != v[j] : v[j] == m) {
                b.v = v[j];
                b.i = j;
                return b;
            }
        return b;  /* every value -inf: index i0 */
    }
#endif
    for (; i < i1; i++) {
        if (v[i] != v[i]) {
            b.v = v[i];
            b.i = i;
            return b;
        }
        if (v[i] > b.v) {
            b.v = v[i];
            b.i = i;
        }
    }
    return b;
}

static int64_t argmax_row(const float *v, int64_t V, int par) {
    if (!par) return argmax_span(v, 0, V).i;
    int nt = omp_get_max_threads();
    best_t parts[256];
    if (nt > 256) nt = 256;
    int64_t per = (V + nt - 1) / nt;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int c = 0; c < nt; c++) {
        int64_t i0 = c * per, i1 = i0 + per < V ? i0 + per : V;
        parts[c] = i0 < i1 ? argmax_span(v, i0, i1) : (best_t){-INFINITY, -1};
    }
    best_t b = parts[0];
    for (int c = 1; c < nt; c++) {
        if (parts[c].i < 0) continue;
        if (b.v != b.v) break;  /* a NaN in an earlier chunk stays first */
        if (parts[c].v != parts[c].v || parts[c].v > b.v) b = parts[c];
    }
    return b.i;
}

/* the draw over every token of a row with no top-k / top-p: scaled logit + Gumbel noise, -inf
 * tokens never chosen; with min-p, tokens with e^(s - m) / S < (1 / S) * min_p left out, as
 * sampling_mask's probs < probs.amax() * min_p */
typedef struct {
    const float *lg;
    float t, m, inv_s, thresh; /* s = lg / t: the exact division sampling_mask makes */
    int min_p;
    uint32_t h;
} full_ctx;

#ifdef __AVX512F__
static inline __m512i mix32x16(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846CA68Bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

/* log(x) for positive normal x, Cephes' logf polynomial (~1 ulp) */
static inline __m512 log16(__m512 x) {
    __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
    __m512 e = _mm512_getexp_ps(x);
    __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.f));
    __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.f)), z = _mm512_mul_ps(f, f);
    __m512 y = _mm512_set1_ps(7.0376836292E-2f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.1514610310E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.1676998740E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.2420140846E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.4249322787E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.6668057665E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.0000714765E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-2.4999993993E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(3.3333331174E-1f));
    y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
    __m512 r = _mm512_add_ps(f, y);
    return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), r);
}

/* 16 tokens at a time: the same hash bits and, up to the last ulp of the logarithms, the
 * same noise as gumbel(); per lane the first best, then lanes merged by (value, index) */
static best_t draw_span16(const full_ctx *c, int64_t i0, int64_t *i1p) {
    int64_t i = i0, i1 = *i1p;
    __m512 bv = _mm512_set1_ps(-INFINITY);
    __m512i bi = _mm512_set1_epi32(-1);
    const __m512i h = _mm512_set1_epi32((int)c->h), lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                                             12, 13, 14, 15);
    const __m512 t = _mm512_set1_ps(c->t), ninf = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= i1; i += 16) {
        __m512 s = _mm512_div_ps(_mm512_loadu_ps(c->lg + i), t);
        __mmask16 ok = _mm512_cmp_ps_mask(s, ninf, _CMP_GT_OQ);
        if (c->min_p) {
            __m512 p = _mm512_mul_ps(hs_exp16(_mm512_sub_ps(s, _mm512_set1_ps(c->m))), _mm512_set1_ps(c->inv_s));
            ok &= _mm512_cmp_ps_mask(p, _mm512_set1_ps(c->thresh), _CMP_GE_OQ);
        }
        __m512i col = _mm512_add_epi32(_mm512_set1_epi32((int)i), lane);
        __m512i x = mix32x16(_mm512_xor_si512(h, mix32x16(_mm512_xor_si512(col, _mm512_set1_epi32(0x27D4EB2F)))));
        x = mix32x16(_mm512_xor_si512(x, h));
        __m512i q = _mm512_add_epi32(_mm512_slli_epi32(_mm512_srli_epi32(x, 9), 1), _mm512_set1_epi32(1));
        __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(1.0f / 16777216.0f));
        __m512 g = _mm512_sub_ps(_mm512_setzero_ps(),
                                 log16(_mm512_sub_ps(_mm512_setzero_ps(), log16(u))));
        __m512 tot = _mm512_add_ps(s, g);
        __mmask16 up = ok & _mm512_cmp_ps_mask(tot, bv, _CMP_GT_OQ);
        up |= ok & _mm512_cmp_epi32_mask(bi, _mm512_set1_epi32(-1), _MM_CMPINT_EQ);
        bv = _mm512_mask_mov_ps(bv, up, tot);
        bi = _mm512_mask_mov_epi32(bi, up, col);
    }
    *i1p = i;  /* the caller finishes the tail */
    float vv[16];
    int32_t ii[16];
    _mm512_storeu_ps(vv, bv);
    _mm512_storeu_si512((void *)ii, bi);
    best_t b = {-INFINITY, -1};
    for (int l = 0; l < 16; l++)
        if (ii[l] >= 0 && (b.i < 0 || ahead(vv[l], ii[l], b.v, b.i))) {
            b.v = vv[l];
            b.i = ii[l];
        }
    return b;
}
#endif

static best_t draw_span(const full_ctx *c, int64_t i0, int64_t i1) {
    best_t b = {-INFINITY, -1};
#ifdef __AVX512F__
    if (i1 - i0 < ((int64_t)1 << 31)) {
        int64_t mid = i1;
        b = draw_span16(c, i0, &mid);
        i0 = mid;
    }
#endif
    for (int64_t i = i0; i < i1; i++) {
        float s = c->lg[i] / c->t;
        if (!(s > -INFINITY)) continue;
        if (c->min_p && expf(s - c->m) * c->inv_s < c->thresh) continue;
        float tot = s + gumbel(c->h, (uint32_t)i);
        if (b.i < 0 || ahead(tot, i, b.v, b.i)) {
            b.v = tot;
            b.i = i;
        }
    }
    return b;
}

/* sum of e^(lg[i] / t - m): the softmax denominator */
static double sum_exp(const float *lg, int64_t n, float t, float m) {
    double sum = 0.0;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    const __m512 vt = _mm512_set1_ps(t), vm = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) {
        __m512 s = _mm512_div_ps(_mm512_loadu_ps(lg + i), vt);
        __mmask16 ok = _mm512_cmp_ps_mask(s, ninf, _CMP_GT_OQ); /* e^-inf = 0, not the clamp's 1e-38 */
        acc = _mm512_mask_add_ps(acc, ok, acc, hs_exp16(_mm512_sub_ps(s, vm)));
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) sum += expf(lg[i] / t - m);
    return sum;
}

/* candidates: a heap with the worst kept entry at the root */
static void sift_down(best_t *hp, int64_t n, int64_t r) {
    for (;;) {
        int64_t l = 2 * r + 1, w = r;
        if (l < n && ahead(hp[w].v, hp[w].i, hp[l].v, hp[l].i)) w = l;
        if (l + 1 < n && ahead(hp[w].v, hp[w].i, hp[l + 1].v, hp[l + 1].i)) w = l + 1;
        if (w == r) return;
        best_t t = hp[r];
        hp[r] = hp[w];
        hp[w] = t;
        r = w;
    }
}

static int by_rank(const void *a, const void *b) {
    const best_t *x = (const best_t *)a, *y = (const best_t *)b;
    return ahead(x->v, x->i, y->v, y->i) ? -1 : ahead(y->v, y->i, x->v, x->i) ? 1 : 0;
}

/* per calling thread: scaled logits, candidates */
static __thread float *s_buf;
static __thread best_t *c_buf;
static __thread int64_t s_cap;

static int64_t sample_row(const void *logits, int lbf16, int64_t r, int64_t V, float temp, int32_t top_k,
                          float top_p, float min_p, int64_t seed, int64_t step, int flags, int par) {
    if (V > s_cap) {
        free(s_buf);
        free(c_buf);
        s_buf = (float *)malloc((size_t)V * 4);
        c_buf = (best_t *)malloc((size_t)V * sizeof(best_t));
        s_cap = s_buf && c_buf ? V : 0;
        if (!s_cap) return -1; /* no token is negative: hs_sample returns -3 */
    }
    const float *lg;
    if (lbf16) {
        row_to_f32(logits, r * V, (int)V, 1, s_buf);
        lg = s_buf;
    } else {
        lg = (const float *)logits + r * V;
    }
    int greedy = (flags & F_ALL_GREEDY) || (!(flags & F_ALL_RANDOM) && temp == 0.0f);
    if (greedy) return argmax_row(lg, V, par && V >= ARGMAX_PAR_MIN);
    /* sampling_mask divides by the temperature (1 where it is not positive) */
    float t = temp > 0.0f ? temp : 1.0f;
    uint32_t h = row_hash(seed, step);
    int64_t k = (flags & F_NO_TOP_K) || top_k <= 0 || top_k >= V ? V : top_k;
    int use_p = !(flags & F_NO_TOP_P) && top_p < 1.0f;
    int use_min = !(flags & F_NO_MIN_P);
    if (k == V && !use_p) {
        full_ctx c = {lg, t, 0.f, 0.f, 0.f, use_min, h};
        float m = use_min ? argmax_span(lg, 0, V).v / t : 0.f;
        /* a +inf (or NaN) logit: native's softmax is NaN there and its probs < thresh drops
         * nothing (the first +inf token then wins the draw) */
        if (use_min && !(m < INFINITY)) c.min_p = 0;
        if (c.min_p) {
            double sum = sum_exp(lg, V, t, m);
            c.m = m;
            c.inv_s = (float)(1.0 / sum);
            c.thresh = c.inv_s * min_p;
        }
        if (!par) {
            best_t b = draw_span(&c, 0, V);
            return b.i < 0 ? 0 : b.i;
        }
        int nt = omp_get_max_threads();
        best_t parts[256];
        if (nt > 256) nt = 256;
        /* chunks of whole 16-token vectors: a token takes the vector or the scalar path
         * (whose logarithms may differ in the last ulp) by its column alone, whatever the split */
        int64_t per = ((V + nt - 1) / nt + 15) & ~(int64_t)15;
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int ci = 0; ci < nt; ci++) {
            int64_t i0 = ci * per, i1 = i0 + per < V ? i0 + per : V;
            parts[ci] = draw_span(&c, i0 < V ? i0 : V, i1);
        }
        best_t b = {-INFINITY, -1};
        for (int ci = 0; ci < nt; ci++)
            if (parts[ci].i >= 0 && (b.i < 0 || ahead(parts[ci].v, parts[ci].i, b.v, b.i))) b = parts[ci];
        return b.i < 0 ? 0 : b.i;
    }
    /* candidates, best first */
    best_t *cand = c_buf;
    int64_t n = 0;
    double total = 0.0; /* top-p without top-k: the softmax runs over the whole row */
    float m = -INFINITY;
    if (k < V) {
        for (int64_t i = 0; i < V; i++) {
            float s = lg[i] / t;
            if (n < k) {
                cand[n].v = s;
                cand[n].i = i;
                n++;
                if (n == k)
                    for (int64_t j = k / 2 - 1; j >= 0; j--) sift_down(cand, k, j);
            } else if (ahead(s, i, cand[0].v, cand[0].i)) {
                cand[0].v = s;
                cand[0].i = i;
                sift_down(cand, k, 0);
            }
        }
    } else {
        float *sc = s_buf;
        for (int64_t i = 0; i < V; i++) sc[i] = lg[i] / t;
        m = argmax_span(sc, 0, V).v;
        total = sum_exp(sc, V, 1.0f, m);
        /* widen a margin below the best until the tokens inside it hold more than p of the
         * mass (with room for rounding): every token below them starts past the nucleus.
         * Past e^-64 of the best the rest cannot matter in float: take the whole row. */
        for (float margin = 8.0f;; margin *= 2.0f) {
            int all = margin > 64.0f;
            double mass = 0.0;
            n = 0;
            for (int64_t i = 0; i < V; i++)
                if (all || sc[i] >= m - margin) {
                    cand[n].v = sc[i];
                    cand[n].i = i;
                    n++;
                    mass += expf(sc[i] - m);
                }
            if (all || mass > ((double)top_p + 1e-3) * total) break;
        }
    }
    qsort(cand, (size_t)n, sizeof(best_t), by_rank);
    int64_t keep = n;
    if (use_p) {
        /* probs over the sorted row (top-k's tail at -inf), cumsum accumulated in double and
         * rounded per entry, as torch's CPU cumsum; a token is dropped once the mass before it
         * exceeds p (never the first) */
        float m0 = cand[0].v;
        if (k < V) {
            total = 0.0;
            for (int64_t j = 0; j < n; j++) total += expf(cand[j].v - m0);
        } else {
            m0 = m;
        }
        float inv = (float)(1.0 / total);
        double cum = 0.0;
        keep = 0;
        for (int64_t j = 0; j < n; j++) {
            float pj = expf(cand[j].v - m0) * inv;
            cum += pj;
            float before = (float)cum - pj;
            if (j > 0 && before > top_p) {
                cand[j].i = -1;  /* dropped */
                continue;
            }
            keep = j + 1;
        }
    }
    if (use_min) {
        float m0 = cand[0].v;
        double sum = 0.0;
        for (int64_t j = 0; j < keep; j++)
            if (cand[j].i >= 0) sum += expf(cand[j].v - m0);
        float inv = (float)(1.0 / sum), thresh = inv * min_p;
        for (int64_t j = 0; j < keep; j++)
            if (cand[j].i >= 0 && expf(cand[j].v - m0) * inv < thresh) cand[j].i = -1;
    }
    best_t b = {-INFINITY, -1};
    for (int64_t j = 0; j < keep; j++) {
        if (cand[j].i < 0 || !(cand[j].v > -INFINITY)) continue;
        float tot = cand[j].v + gumbel(h, (uint32_t)cand[j].i);
        if (b.i < 0 || ahead(tot, cand[j].i, b.v, b.i)) {
            b.v = tot;
            b.i = cand[j].i;
        }
    }
    return b.i < 0 ? 0 : b.i;
}

/* logits [B, V] float32 (lbf16 = 0) or bfloat16 -> out [B] int64. Per-row parameters as
 * SamplingTensors holds them; flags carry its host hints (F_*). With F_ALL_GREEDY the
 * parameter pointers are not read (the caller may pass 0: no conversions for them). */
int hs_sample(const void *logits, int lbf16, int64_t B, int64_t V, const float *temp, const int32_t *top_k,
              const float *top_p, const float *min_p, const int64_t *seeds, const int64_t *steps, int flags,
              int64_t *out) {
    int g = (flags & F_ALL_GREEDY) != 0;
    if (B == 1) {
        int par = V >= DRAW_PAR_MIN && omp_get_max_threads() > 1;
        out[0] = g ? sample_row(logits, lbf16, 0, V, 0.f, 0, 1.f, 0.f, 0, 0, flags, par)
                   : sample_row(logits, lbf16, 0, V, temp[0], top_k[0], top_p[0], min_p[0], seeds[0], steps[0],
                                flags, par);
        return out[0] < 0 ? -3 : 0;
    }
#pragma omp parallel for schedule(dynamic, 1) if (B * V >= ROWS_PAR_MIN)
    for (int64_t r = 0; r < B; r++)
        out[r] = g ? sample_row(logits, lbf16, r, V, 0.f, 0, 1.f, 0.f, 0, 0, flags, 0)
                   : sample_row(logits, lbf16, r, V, temp[r], top_k[r], top_p[r], min_p[r], seeds[r], steps[r],
                                flags, 0);
    for (int64_t r = 0; r < B; r++)
        if (out[r] < 0) return -3;
    return 0;
}
