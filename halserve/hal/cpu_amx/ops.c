/* The small fused ops around the GEMMs: rms_norm (+ residual), rotary, silu_and_mul,
 * write_kv. One pass over memory each; rows split across the pool when there are enough. */
#include "common.h"
#include <stdlib.h>

#define PAR_ROWS 8 /* below this many rows a parallel region costs more than it saves */

/* one row of float scratch per calling thread, kept between calls (a malloc per row
 * costs more than a decode row's work) */
static __thread float *row_buf;
static __thread int row_cap;

static float *scratch_row(int n) {
    if (n > row_cap) {
        free(row_buf);
        row_buf = (float *)malloc((size_t)n * 4);
        row_cap = row_buf ? n : 0;
    }
    return row_buf;
}

/* h = x + residual (rounded to the dtype, as the model stores it); y = h / rms(h) * w */
static void rms_row(const void *x, const void *res, const void *w, int w_bf16, void *y, void *h_out,
                    int64_t off, int H, float eps, int bf16, float *h) {
#ifdef __AVX512F__
    if (bf16 && H % 16 == 0) {
        /* bf16 rows 16 lanes at a time (the loops below convert value by value): the same
         * roundings, the square sum in 16 lanes then added across (another order than the
         * loop's: a value may differ from it by one bf16 step; every row of every call takes
         * this path, so batch invariance holds). A 32 x 2048 norm with its residual, this
         * 2-vCPU box (bench/cpu_small_ops.py): 29-38 -> 21-23 us on 2 threads, 46-48 -> 30-32
         * on 1 */
        const bf16_t *xb = (const bf16_t *)x + off, *rb = res ? (const bf16_t *)res + off : NULL;
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < H; i += 16) {
            __m512 a = hs_bf16x16_load(xb + i);
            if (rb) {
                __m256i hb = hs_bf16x16_round(_mm512_add_ps(a, hs_bf16x16_load(rb + i)));
                _mm256_storeu_si256((__m256i *)((bf16_t *)h_out + off + i), hb);
                a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hb), 16));
            }
            _mm512_storeu_ps(h + i, a);
            acc = _mm512_fmadd_ps(a, a, acc);
        }
        __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)H + eps));
        bf16_t *yb = (bf16_t *)y + off;
        for (int i = 0; i < H; i += 16) {
            __m512 wv = w_bf16 ? hs_bf16x16_load((const bf16_t *)w + i) : _mm512_loadu_ps((const float *)w + i);
            hs_bf16x16_store(yb + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(h + i), r), wv));
        }
        return;
    }
#endif
    row_to_f32(x, off, H, bf16, h);
    if (res) {
        for (int i = 0; i < H; i++) {
            float v = h[i] + load_f(res, off + i, bf16);
            h[i] = bf16 ? bf16_to_f32(f32_to_bf16(v)) : v;
        }
        row_from_f32(h_out, off, H, bf16, h);
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < H; i++) ss += h[i] * h[i];
    float r = 1.0f / sqrtf(ss / (float)H + eps);
    for (int i = 0; i < H; i++) h[i] = h[i] * r * load_f(w, i, w_bf16);
    row_from_f32(y, off, H, bf16, h);
}

void hs_rms_norm(const void *x, const void *res, const void *w, int w_bf16, void *y, void *h_out,
                 int T, int H, float eps, int bf16) {
    if (T < PAR_ROWS) {  /* decode: the calling thread, no region to wake the pool for */
        float *h = scratch_row(H);
        for (int t = 0; t < T; t++) rms_row(x, res, w, w_bf16, y, h_out, (int64_t)t * H, H, eps, bf16, h);
        return;
    }
#pragma omp parallel
    {
        float *h = scratch_row(H);
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) rms_row(x, res, w, w_bf16, y, h_out, (int64_t)t * H, H, eps, bf16, h);
    }
}

/* In place on q [T, Hq, D] and k [T, Hk, D]; cos_sin [max_pos, rot] (cos | sin), float32.
 * Each pair is read and written where it lies (no row buffers); neox halves in one vector
 * pass. */
static inline void rot_row(void *base, int64_t off, const float *cs, int half, int is_neox, int bf16) {
    const float *cv = cs, *sv = cs + half;
    if (is_neox && bf16) {  /* the halves are contiguous: one vector pass */
        bf16_t *p1 = (bf16_t *)base + off, *p2 = p1 + half;
#pragma omp simd
        for (int i = 0; i < half; i++) {
            float x1 = bf16_to_f32(p1[i]), x2 = bf16_to_f32(p2[i]);
            p1[i] = f32_to_bf16(x1 * cv[i] - x2 * sv[i]);
            p2[i] = f32_to_bf16(x2 * cv[i] + x1 * sv[i]);
        }
    } else if (is_neox) {
        float *p1 = (float *)base + off, *p2 = p1 + half;
#pragma omp simd
        for (int i = 0; i < half; i++) {
            float x1 = p1[i], x2 = p2[i];
            p1[i] = x1 * cv[i] - x2 * sv[i];
            p2[i] = x2 * cv[i] + x1 * sv[i];
        }
    } else if (bf16) {
        bf16_t *p = (bf16_t *)base + off;
        for (int i = 0; i < half; i++) {
            float x1 = bf16_to_f32(p[2 * i]), x2 = bf16_to_f32(p[2 * i + 1]);
            p[2 * i] = f32_to_bf16(x1 * cv[i] - x2 * sv[i]);
            p[2 * i + 1] = f32_to_bf16(x2 * cv[i] + x1 * sv[i]);
        }
    } else {
        float *p = (float *)base + off;
        for (int i = 0; i < half; i++) {
            float x1 = p[2 * i], x2 = p[2 * i + 1];
            p[2 * i] = x1 * cv[i] - x2 * sv[i];
            p[2 * i + 1] = x2 * cv[i] + x1 * sv[i];
        }
    }
}

/* rotary over T tokens; a token whose position is outside [0, npos) (the cos/sin table's
 * rows) is left as it is. Returns how many were. */
int hs_rotary(const int64_t *pos, void *q, void *k, const float *cos_sin, int T, int Hq, int Hk,
              int D, int rot, int is_neox, int bf16, int64_t npos) {
    int half = rot / 2, bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (T >= PAR_ROWS)
    for (int t = 0; t < T; t++) {
        if ((uint64_t)pos[t] >= (uint64_t)npos) { /* negative too */
            bad++;
            continue;
        }
        const float *cs = cos_sin + pos[t] * rot;
        for (int hh = 0; hh < Hq; hh++) rot_row(q, ((int64_t)t * Hq + hh) * D, cs, half, is_neox, bf16);
        for (int hh = 0; hh < Hk; hh++) rot_row(k, ((int64_t)t * Hk + hh) * D, cs, half, is_neox, bf16);
    }
    return bad;
}

#define SILU_CHUNK 512 /* values per work item: chunks of a row when rows are few */
/* below this many outputs the calling thread does it alone: a vectorized silu runs at
 * ~1 ns a value, while waking a sleeping pool (OMP_WAIT_POLICY=PASSIVE) costs 15-45 us */
#define SILU_PAR_MIN (1 << 16)

static void silu_span(const void *x, void *y, int64_t xo, int64_t yo, int I, int i0, int i1, int bf16) {
    int i = i0;
#ifdef __AVX512F__
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= i1; i += 16) {
        __m512 a, b;
        if (bf16) {
            a = hs_bf16x16_load((const bf16_t *)x + xo + i);
            b = hs_bf16x16_load((const bf16_t *)x + xo + I + i);
        } else {
            a = _mm512_loadu_ps((const float *)x + xo + i);
            b = _mm512_loadu_ps((const float *)x + xo + I + i);
        }
        __m512 e = hs_exp16(_mm512_sub_ps(_mm512_setzero_ps(), a));
        __m512 v = _mm512_mul_ps(_mm512_div_ps(a, _mm512_add_ps(one, e)), b);
        if (bf16) hs_bf16x16_store((bf16_t *)y + yo + i, v);
        else _mm512_storeu_ps((float *)y + yo + i, v);
    }
#endif
    for (; i < i1; i++) {
        float a = load_f(x, xo + i, bf16), b = load_f(x, xo + I + i, bf16);
        store_f(y, yo + i, a / (1.0f + expf(-a)) * b, bf16);
    }
}

void hs_silu_and_mul(const void *x, void *y, int T, int I, int bf16) {
    /* elementwise, and every value takes the same path (lane or tail) whatever the split:
     * the split changes nothing in the result */
    int per = (I + SILU_CHUNK - 1) / SILU_CHUNK;
    int64_t items = (int64_t)T * per;
#pragma omp parallel for schedule(static) if ((int64_t)T * I >= SILU_PAR_MIN)
    for (int64_t it = 0; it < items; it++) {
        int t = (int)(it / per), c = (int)(it % per);
        int i0 = c * SILU_CHUNK, i1 = i0 + SILU_CHUNK < I ? i0 + SILU_CHUNK : I;
        silu_span(x, y, (int64_t)t * 2 * I, (int64_t)t * I, I, i0, i1, bf16);
    }
}

/* key/value [T, row] -> cache[slot] for 0 <= slot < nslots (``row`` bytes per token: Hk * D *
 * esize); a negative slot is padding, skipped. A slot at or past nslots is skipped too and
 * counted: the return value (the caller raises; one compare a row, nothing beside the copy). */
int hs_write_kv(const char *key, const char *value, char *kcache, char *vcache,
                const int64_t *slots, int T, int64_t row, int64_t nslots) {
    int bad = 0;
    for (int t = 0; t < T; t++) {
        int64_t s = slots[t];
        if (s < 0) continue;
        if (s >= nslots) {
            bad++;
            continue;
        }
        memcpy(kcache + s * row, key + (int64_t)t * row, (size_t)row);
        memcpy(vcache + s * row, value + (int64_t)t * row, (size_t)row);
    }
    return bad;
}

/* rotary then write_kv in one call (the engine's rotary_write_kv): each token's q and k heads
 * rotated in place by rot_row, then its k row as rotated and its v row copied to the cache
 * slot (skipped for -1); the same bytes the two calls leave. With qw, kw (Qwen3's per-head
 * norms, w_bf16 their dtype) each head row first goes through rms_row in place, as
 * hs_rms_norm over [T * heads, D] rows. One region over the tokens from PAR_ROWS; a decode
 * token runs on the calling thread, one FFI call a layer fewer (three with the norms).
 * A token whose position is outside [0, npos) is neither normed, rotated nor written, one
 * whose slot is at or past nslots is not written: returns how many tokens were either. */
int hs_rotary_write_kv(const int64_t *pos, void *q, void *k, const void *v, const float *cos_sin,
                       char *kcache, char *vcache, const int64_t *slots, int T, int Hq, int Hk, int D,
                       int rot, int is_neox, int bf16, const void *qw, const void *kw, int w_bf16, float eps,
                       int64_t npos, int64_t nslots) {
    int half = rot / 2, bad = 0;
    int64_t row = (int64_t)Hk * D * (bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) reduction(+ : bad) if (T >= PAR_ROWS)
    for (int t = 0; t < T; t++) {
        if ((uint64_t)pos[t] >= (uint64_t)npos) {
            bad++;
            continue;
        }
        const float *cs = cos_sin + pos[t] * rot;
        if (qw) {
            float *h = scratch_row(D);
            for (int hh = 0; hh < Hq; hh++)
                rms_row(q, NULL, qw, w_bf16, q, NULL, ((int64_t)t * Hq + hh) * D, D, eps, bf16, h);
            for (int hh = 0; hh < Hk; hh++)
                rms_row(k, NULL, kw, w_bf16, k, NULL, ((int64_t)t * Hk + hh) * D, D, eps, bf16, h);
        }
        for (int hh = 0; hh < Hq; hh++) rot_row(q, ((int64_t)t * Hq + hh) * D, cs, half, is_neox, bf16);
        for (int hh = 0; hh < Hk; hh++) rot_row(k, ((int64_t)t * Hk + hh) * D, cs, half, is_neox, bf16);
        int64_t s = slots[t];
        if (s < 0) continue;
        if (s >= nslots) {
            bad++;
            continue;
        }
        memcpy(kcache + s * row, (const char *)k + (int64_t)t * row, (size_t)row);
        memcpy(vcache + s * row, (const char *)v + (int64_t)t * row, (size_t)row);
    }
    return bad;
}
