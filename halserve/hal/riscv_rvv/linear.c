/* y = x W^T (+ bias): one dot product per output, float32 accumulation. Work is split over
 * output columns (weight rows), so batch-1 decode uses every core; each weight row is
 * converted once and reused for every input row. A row's result depends only on that row
 * and the weights: batch invariant by construction. */
#include <stdlib.h>
#include "hs_rvv.h"

void hs_linear(const void *x, int xdt, int64_t m, int64_t k, int64_t ldx,
               const void *w, int wdt, int64_t n, const float *scale, int per_channel,
               const void *bias, void *y, int ydt) {
    size_t xes = hs_esize(xdt), wes = hs_esize(wdt), yes = hs_esize(ydt);
    float *xf = (float *)malloc((size_t)(m * k + m * n + n) * sizeof(float));
    float *yf = xf + m * k, *bf = yf + m * n;
    for (int64_t i = 0; i < m; i++) hs_load((const char *)x + (size_t)(i * ldx) * xes, xdt, xf + i * k, k);
    if (bias) hs_load(bias, ydt, bf, n);
#pragma omp parallel
    {
        float *wrow = wdt == HS_F32 ? NULL : (float *)malloc((size_t)k * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            const float *wr = (const float *)w + j * k;
            if (wrow) { hs_load((const char *)w + (size_t)(j * k) * wes, wdt, wrow, k); wr = wrow; }
            float s = scale ? scale[per_channel ? j : 0] : 1.0f;
            float b = bias ? bf[j] : 0.0f;
            for (int64_t i = 0; i < m; i++) {
                float acc = hs_dot(xf + i * k, wr, k);
                yf[i * n + j] = (scale ? acc * s : acc) + b;
            }
        }
        free(wrow);
    }
    for (int64_t i = 0; i < m; i++) hs_store(yf + i * n, (char *)y + (size_t)(i * n) * yes, ydt, n);
    free(xf);
}
