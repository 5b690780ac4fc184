/* Sampling, one row per work item: greedy argmax, or Gumbel-max over the temperature-scaled
 * logits left by top-k / top-p / min-p, with noise from the HAL's counter-based hash (the
 * bit recipe of halserve.hal.native.counter_uniform), so a row's draw is a function of its
 * seed, step and logits only. */
#include <stdlib.h>
#include "hs_rvv.h"

static uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

static float uniform(uint32_t h, uint32_t col) {
    uint32_t x = mix32(h ^ mix32(col ^ 0x27D4EB2Fu));
    x = mix32(x ^ h);
    return (float)((x >> 9) * 2u + 1u) * (1.0f / 16777216.0f);
}

typedef struct { float v; int64_t i; } hs_pair;

static int by_value_desc(const void *a, const void *b) {
    const hs_pair *x = (const hs_pair *)a, *y = (const hs_pair *)b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

static int64_t argmax(const float *v, int64_t n) {
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++) if (v[i] > v[b]) b = i;
    return b;
}

void hs_sample(const float *logits, int64_t b, int64_t v, const float *temp, const int32_t *top_k,
               const float *top_p, const float *min_p, const int64_t *seeds, const int64_t *steps,
               int64_t *out) {
#pragma omp parallel
    {
        float *sc = (float *)malloc((size_t)v * sizeof(float));
        hs_pair *order = (hs_pair *)malloc((size_t)v * sizeof(hs_pair));
#pragma omp for schedule(dynamic, 4)
        for (int64_t r = 0; r < b; r++) {
            const float *lg = logits + r * v;
            if (temp[r] <= 0.0f) { out[r] = argmax(lg, v); continue; }
            for (int64_t i = 0; i < v; i++) sc[i] = lg[i] / temp[r];
            int64_t k = top_k[r] <= 0 || top_k[r] >= v ? v : top_k[r];
            float p = top_p[r];
            if (k < v || p < 1.0f) {
                for (int64_t i = 0; i < v; i++) { order[i].v = sc[i]; order[i].i = i; }
                qsort(order, (size_t)v, sizeof(hs_pair), by_value_desc);
                int64_t keep = k;
                if (p < 1.0f) {  /* drop a token once the mass before it exceeds p */
                    float mx = order[0].v, sum = 0.0f, before = 0.0f;
                    for (int64_t j = 0; j < k; j++) sum += expf(order[j].v - mx);
                    for (int64_t j = 0; j < k; j++) {
                        if (j > 0 && before > p) { keep = j; break; }
                        before += expf(order[j].v - mx) / sum;
                    }
                }
                for (int64_t j = keep; j < v; j++) sc[order[j].i] = -INFINITY;
            }
            if (min_p[r] > 0.0f) {  /* probs < max prob * min_p  <=>  logit < max + log(min_p) */
                float mx = sc[argmax(sc, v)], cut = mx + logf(min_p[r]);
                for (int64_t i = 0; i < v; i++) if (sc[i] < cut) sc[i] = -INFINITY;
            }
            uint64_t sd = (uint64_t)seeds[r], st = (uint64_t)steps[r];
            uint32_t h = mix32((uint32_t)sd ^ 0x9E3779B9u);
            h = mix32(h ^ (uint32_t)(sd >> 32));
            h = mix32(h ^ (uint32_t)st ^ 0x85EBCA6Bu);
            h = mix32(h ^ (uint32_t)(st >> 32));
            int64_t bi = -1;
            float bv = -INFINITY;
            for (int64_t i = 0; i < v; i++) {
                if (sc[i] == -INFINITY) continue;
                float g = sc[i] - logf(-logf(uniform(h, (uint32_t)i)));
                if (bi < 0 || g > bv) { bv = g; bi = i; }
            }
            out[r] = bi < 0 ? argmax(lg, v) : bi;
        }
        free(sc);
        free(order);
    }
}
