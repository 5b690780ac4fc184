/* The small fused ops around the GEMMs: rms_norm (+ residual), rotary, silu_and_mul,
 * write_kv. One pass over memory each; rows split across the pool when there are enough. */
#include "common.h"
#include <stdlib.h>

#define PAR_ROWS 8 /* below this many rows a parallel region costs more than it saves */

/* h = x + residual (rounded to the dtype, as the model stores it); y = h / rms(h) * w */
void hs_rms_norm(const void *x, const void *res, const void *w, int w_bf16, void *y, void *h_out,
                 int T, int H, float eps, int bf16) {
#pragma omp parallel for schedule(static) if (T >= PAR_ROWS)
    for (int t = 0; t < T; t++) {
        float *h = (float *)malloc((size_t)H * 4);
        int64_t off = (int64_t)t * H;
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
        free(h);
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

void hs_rotary(const int64_t *pos, void *q, void *k, const float *cos_sin, int T, int Hq, int Hk,
               int D, int rot, int is_neox, int bf16) {
    int half = rot / 2;
#pragma omp parallel for schedule(static) if (T >= PAR_ROWS)
    for (int t = 0; t < T; t++) {
        const float *cs = cos_sin + pos[t] * rot;
        for (int hh = 0; hh < Hq; hh++) rot_row(q, ((int64_t)t * Hq + hh) * D, cs, half, is_neox, bf16);
        for (int hh = 0; hh < Hk; hh++) rot_row(k, ((int64_t)t * Hk + hh) * D, cs, half, is_neox, bf16);
    }
}

#define SILU_CHUNK 512 /* values per work item: a decode row (T = 1) of I = 5632 spreads over 11 threads */

void hs_silu_and_mul(const void *x, void *y, int T, int I, int bf16) {
    /* elementwise, so the split changes nothing in the result: chunks of a row when rows
     * are few (decode), whole rows otherwise */
    int per = (I + SILU_CHUNK - 1) / SILU_CHUNK;
    int64_t items = (int64_t)T * per;
#pragma omp parallel for schedule(static) if (items >= 4 && (hs_small_par || T >= PAR_ROWS))
    for (int64_t it = 0; it < items; it++) {
        int t = (int)(it / per), c = (int)(it % per);
        int i0 = c * SILU_CHUNK, i1 = i0 + SILU_CHUNK < I ? i0 + SILU_CHUNK : I;
        int64_t xo = (int64_t)t * 2 * I, yo = (int64_t)t * I;
        for (int i = i0; i < i1; i++) {
            float a = load_f(x, xo + i, bf16), b = load_f(x, xo + I + i, bf16);
            store_f(y, yo + i, a / (1.0f + expf(-a)) * b, bf16);
        }
    }
}

/* key/value [T, row] -> cache[slot] for slot >= 0; ``row`` bytes per token (Hk * D * esize). */
void hs_write_kv(const char *key, const char *value, char *kcache, char *vcache,
                 const int64_t *slots, int T, int64_t row) {
    for (int t = 0; t < T; t++) {
        int64_t s = slots[t];
        if (s < 0) continue;
        memcpy(kcache + s * row, key + (int64_t)t * row, (size_t)row);
        memcpy(vcache + s * row, value + (int64_t)t * row, (size_t)row);
    }
}
