/* Mixture of experts: routing (softmax or sigmoid scores, correction bias, grouped
 * selection, renormalisation, scaling) and each token's expert MLPs, matrix-vector
 * products split over cores so one token (decode) uses them all. */
#include <stdlib.h>
#include "hs_rvv.h"

/* index of the largest v[i] with allowed[i], lowest index on ties; -1 if none */
static int64_t best(const float *v, const unsigned char *allowed, int64_t n) {
    int64_t b = -1;
    for (int64_t i = 0; i < n; i++)
        if (allowed[i] && (b < 0 || v[i] > v[b])) b = i;
    return b;
}

static void route(const float *lg, int64_t e, int top_k, int scoring, int renorm, int groups,
                  int topk_group, const float *bias, float routed_scale, float *scores, float *choice,
                  unsigned char *ok, int64_t *ids, float *wts) {
    if (scoring == 0) {
        float mx = lg[0], sum = 0.0f;
        for (int64_t i = 1; i < e; i++) if (lg[i] > mx) mx = lg[i];
        for (int64_t i = 0; i < e; i++) { scores[i] = expf(lg[i] - mx); sum += scores[i]; }
        for (int64_t i = 0; i < e; i++) scores[i] /= sum;
    } else {
        for (int64_t i = 0; i < e; i++) scores[i] = 1.0f / (1.0f + expf(-lg[i]));
    }
    for (int64_t i = 0; i < e; i++) { choice[i] = bias ? scores[i] + bias[i] : scores[i]; ok[i] = 1; }
    if (groups > 1) {
        int64_t per = e / groups;
        float gs[256];
        unsigned char gok[256];
        for (int g = 0; g < groups; g++) {
            const float *c = choice + g * per;
            if (scoring == 1) {  /* sum of the group's top two */
                int64_t a = 0;
                for (int64_t i = 1; i < per; i++) if (c[i] > c[a]) a = i;
                float second = -INFINITY;
                for (int64_t i = 0; i < per; i++) if (i != a && c[i] > second) second = c[i];
                gs[g] = c[a] + (per > 1 ? second : 0.0f);
            } else {
                float mx = c[0];
                for (int64_t i = 1; i < per; i++) if (c[i] > mx) mx = c[i];
                gs[g] = mx;
            }
            gok[g] = 1;
        }
        unsigned char keep[256] = {0};
        for (int s = 0; s < topk_group; s++) {
            int64_t g = best(gs, gok, groups);
            keep[g] = 1;
            gok[g] = 0;
        }
        for (int64_t i = 0; i < e; i++) ok[i] = keep[i / per];
    }
    float sum = 0.0f;
    for (int k = 0; k < top_k; k++) {
        int64_t b = best(choice, ok, e);
        ok[b] = 0;
        ids[k] = b;
        wts[k] = scores[b];
        sum += wts[k];
    }
    for (int k = 0; k < top_k; k++) wts[k] = (renorm ? wts[k] / sum : wts[k]) * routed_scale;
}

/* y[j] = s_j * (W[j] . x) for j < n; W rows of length k, dtype wdt */
static void gemv(const void *w, int wdt, const float *sc, int per_channel, const float *x,
                 int64_t n, int64_t k, float *y) {
    size_t wes = hs_esize(wdt);
#pragma omp parallel
    {
        float *wrow = wdt == HS_F32 ? NULL : (float *)malloc((size_t)k * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            const float *wr = (const float *)w + j * k;
            if (wrow) { hs_load((const char *)w + (size_t)(j * k) * wes, wdt, wrow, k); wr = wrow; }
            float acc = hs_dot(x, wr, k);
            y[j] = sc ? acc * sc[per_channel ? j : 0] : acc;
        }
        free(wrow);
    }
}

void hs_moe(const void *x, int dt, int64_t t, int64_t h, const float *logits, int64_t e,
            const void *w13, int wdt, const float *s13, const void *w2, const float *s2, int64_t inter,
            int per_channel, int top_k, int scoring, int renorm, int groups, int topk_group,
            const float *bias, float routed_scale, void *out) {
    size_t es = hs_esize(dt), wes = hs_esize(wdt);
    float *scores = (float *)malloc((size_t)(2 * e + h * 3 + 3 * inter + top_k) * sizeof(float));
    float *choice = scores + e, *xf = choice + e, *acc = xf + h, *y = acc + h, *gu = y + h;
    float *wts = gu + 3 * inter;
    unsigned char *ok = (unsigned char *)malloc((size_t)e);
    int64_t *ids = (int64_t *)malloc((size_t)top_k * sizeof(int64_t));
    for (int64_t r = 0; r < t; r++) {
        route(logits + r * e, e, top_k, scoring, renorm, groups, topk_group, bias, routed_scale,
              scores, choice, ok, ids, wts);
        hs_load((const char *)x + (size_t)(r * h) * es, dt, xf, h);
        memset(acc, 0, (size_t)h * sizeof(float));
        for (int k = 0; k < top_k; k++) {
            int64_t ex = ids[k];
            const float *sa = s13 ? (per_channel ? s13 + ex * 2 * inter : s13) : NULL;
            const float *sb = s2 ? (per_channel ? s2 + ex * h : s2) : NULL;
            gemv((const char *)w13 + (size_t)(ex * 2 * inter * h) * wes, wdt, sa, per_channel, xf,
                 2 * inter, h, gu);
            float *hid = gu + 2 * inter;
            /* the activation is stored in the model dtype between the two GEMMs, as native does */
            for (int64_t i = 0; i < inter; i++) hid[i] = hs_round(hs_silu(gu[i]) * gu[inter + i], dt);
            gemv((const char *)w2 + (size_t)(ex * h * inter) * wes, wdt, sb, per_channel, hid, h, inter, y);
            hs_axpy(acc, wts[k], y, h);
        }
        hs_store(acc, (char *)out + (size_t)(r * h) * es, dt, h);
    }
    free(scores);
    free(ok);
    free(ids);
}
