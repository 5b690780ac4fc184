/* rms_norm (+ residual), silu_and_mul and rotary: one row (or token) per work item. */
#include <stdlib.h>
#include "hs_rvv.h"

void hs_rms_norm(const void *x, const void *res, const void *w, int dt, int64_t t, int64_t h,
                 int64_t ldx, int64_t ldr, float eps, void *out, void *hout) {
    size_t es = hs_esize(dt);
    float *wf = (float *)malloc((size_t)h * sizeof(float));
    hs_load(w, dt, wf, h);
#pragma omp parallel
    {
        float *a = (float *)malloc((size_t)h * 2 * sizeof(float)), *b = a + h;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < t; r++) {
            hs_load((const char *)x + (size_t)(r * ldx) * es, dt, a, h);
            if (res) {
                /* h = x + residual, stored in the input dtype: the norm reads the rounded sum */
                hs_load((const char *)res + (size_t)(r * ldr) * es, dt, b, h);
                for (int64_t i = 0; i < h; i++) a[i] = hs_round(a[i] + b[i], dt);
                hs_store(a, (char *)hout + (size_t)(r * h) * es, dt, h);
            }
            float inv = 1.0f / sqrtf(hs_dot(a, a, h) / (float)h + eps);
            hs_scal(a, inv, h);
            hs_mul(b, a, wf, h);
            hs_store(b, (char *)out + (size_t)(r * h) * es, dt, h);
        }
        free(a);
    }
    free(wf);
}

void hs_silu_and_mul(const void *x, int dt, int64_t t, int64_t i, int64_t ldx, void *out) {
    size_t es = hs_esize(dt);
#pragma omp parallel
    {
        float *g = (float *)malloc((size_t)i * 2 * sizeof(float)), *u = g + i;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < t; r++) {
            hs_load((const char *)x + (size_t)(r * ldx) * es, dt, g, 2 * i);
            for (int64_t c = 0; c < i; c++) g[c] = hs_silu(g[c]);
            hs_mul(g, g, u, i);
            hs_store(g, (char *)out + (size_t)(r * i) * es, dt, i);
        }
        free(g);
    }
}

static void rotate(char *p, int dt, const float *cs, int64_t rot, int neox, float *buf) {
    int64_t half = rot / 2;
    const float *c = cs, *s = cs + half;
    hs_load(p, dt, buf, rot);
    float *o = buf + rot;
    if (neox) {
        for (int64_t i = 0; i < half; i++) {
            float x1 = buf[i], x2 = buf[half + i];
            o[i] = x1 * c[i] - x2 * s[i];
            o[half + i] = x2 * c[i] + x1 * s[i];
        }
    } else {
        for (int64_t i = 0; i < half; i++) {
            float x1 = buf[2 * i], x2 = buf[2 * i + 1];
            o[2 * i] = x1 * c[i] - x2 * s[i];
            o[2 * i + 1] = x2 * c[i] + x1 * s[i];
        }
    }
    hs_store(o, p, dt, rot);
}

/* A token whose position is outside [0, npos) (the table's rows) is left as it is and counted:
 * the return value (-3: a row buffer could not be had). */
int hs_rotary(const int64_t *pos, void *q, void *k, int dt, int64_t t, int64_t hq, int64_t hk,
              int64_t d, int64_t qst, int64_t kst, const float *cache, int64_t rot, int neox, int64_t npos) {
    size_t es = hs_esize(dt);
    int bad = 0, oom = 0;
#pragma omp parallel reduction(+ : bad, oom)
    {
        float *buf = (float *)malloc((size_t)rot * 2 * sizeof(float));
        oom += !buf;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < t; r++) {
            if (!buf) continue;
            if (pos[r] < 0 || pos[r] >= npos) {
                bad++;
                continue;
            }
            const float *cs = cache + pos[r] * rot;
            for (int64_t hd = 0; hd < hq; hd++)
                rotate((char *)q + (size_t)(r * qst + hd * d) * es, dt, cs, rot, neox, buf);
            for (int64_t hd = 0; hd < hk; hd++)
                rotate((char *)k + (size_t)(r * kst + hd * d) * es, dt, cs, rot, neox, buf);
        }
        free(buf);
    }
    return oom ? -3 : bad;
}
