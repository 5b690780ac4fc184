/* Fused MoE for a few tokens (decode): every (token, chosen expert) pair's gate/up GEMV,
 * activation and down GEMV run in one parallel region, the pairs' rows spread over the
 * pool together, so the experts run side by side instead of one after another (and no
 * per-expert call from Python). Weights: float32 / bfloat16 as stored, or int8 with one
 * scale per output row. ``rb``: round intermediates to bfloat16 as a bf16 model stores them. */
#include "common.h"

#define RB 16 /* output rows per work item */

static inline float dot_row(const float *x, const void *w, int64_t row, int K, int kind, const float *scale) {
    float a = 0.f;
    if (kind == 1) {
        const bf16_t *r = (const bf16_t *)w + row * K;
#pragma omp simd reduction(+ : a)
        for (int k = 0; k < K; k++) a += x[k] * bf16_to_f32(r[k]);
    } else if (kind == 2) {
        const int8_t *r = (const int8_t *)w + row * K;
#pragma omp simd reduction(+ : a)
        for (int k = 0; k < K; k++) a += x[k] * (float)r[k];
        a *= scale[row];
    } else {
        const float *r = (const float *)w + row * K;
#pragma omp simd reduction(+ : a)
        for (int k = 0; k < K; k++) a += x[k] * r[k];
    }
    return a;
}

static inline float rnd(float v, int rb) { return rb ? bf16_to_f32(f32_to_bf16(v)) : v; }

void hs_moe_small(const float *x, int T, int H, int I, int topk, const int64_t *ids, const float *tw,
                  const void *w13, const float *s13, const void *w2, const float *s2, int kind, int rb,
                  float *gu, float *act, float *y, float *out) {
    int P = T * topk, b13 = (2 * I + RB - 1) / RB, b2 = (H + RB - 1) / RB;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t it = 0; it < (int64_t)P * b13; it++) {
            int p = (int)(it / b13), n0 = (int)(it % b13) * RB, t = p / topk;
            int64_t e = ids[p];
            int n1 = n0 + RB < 2 * I ? n0 + RB : 2 * I;
            for (int n = n0; n < n1; n++)
                gu[(int64_t)p * 2 * I + n] = rnd(dot_row(x + (int64_t)t * H, w13, e * 2 * I + n, H, kind, s13), rb);
        }
#pragma omp for schedule(static)
        for (int64_t pi = 0; pi < (int64_t)P * I; pi++) {
            int64_t p = pi / I, i = pi % I;
            float g = gu[p * 2 * I + i], u = gu[p * 2 * I + I + i];
            act[pi] = rnd(g / (1.0f + expf(-g)) * u, rb);
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < (int64_t)P * b2; it++) {
            int p = (int)(it / b2), n0 = (int)(it % b2) * RB;
            int64_t e = ids[p];
            int n1 = n0 + RB < H ? n0 + RB : H;
            for (int n = n0; n < n1; n++)
                y[(int64_t)p * H + n] = rnd(dot_row(act + (int64_t)p * I, w2, e * H + n, I, kind, s2), rb);
        }
#pragma omp for schedule(static)
        for (int64_t tn = 0; tn < (int64_t)T * H; tn++) {
            int64_t t = tn / H, n = tn % H;
            float a = 0.f;
            for (int k = 0; k < topk; k++) a += tw[t * topk + k] * y[(t * topk + k) * H + n];
            out[tn] = a;
        }
    }
}
