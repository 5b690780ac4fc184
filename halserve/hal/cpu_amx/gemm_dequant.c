/* Weight-only int8 / int4 rows [n0, n1) -> float32 or bfloat16, for the large-M (prefill) GEMM.
 *
 * Each value is (float)q * scale, rounded once to the output dtype: bit for bit what
 * torch computes as (q.float() * scale).to(dtype), the numerics the weight-only schemes
 * define. torch's version makes three passes through float32 temporaries (about 2x the
 * GEMM's own time at M = 1024); this is one pass, split over rows, and the caller asks for a
 * block of rows at a time so the bf16 copy stays cache-sized instead of a whole weight.
 *
 * kind 2: int8 [N][K], one scale per row.  kind 3: int4 [N][K/2] (in each run of 32 values,
 * byte j holds value j in its low nibble and value j + 16 in its high one, stored q + 8),
 * one scale per row and group of ``group`` values. kind 5: int4 in the x16 layout (below). */
#include "common.h"

#define KC 512 /* columns per pass: a multiple of 32 (an int4 run) and of every int4 group */

/* kind 5: int4 in linear_q.c's x16 layout (16-row blocks, 64-byte chunks of 8 columns, word
 * 2i + e of row i holding column 8c + 2j + e in nibble j; scales [block][group][16]) */
static void dequant_x16(const uint8_t *w, const float *scale, int group, int K, int n, int k0, int kn, float *row) {
    int b = n / 16, i = n % 16;
    const uint8_t *wb = w + (int64_t)b * (K / 8) * 64;
    const float *sb = scale + (int64_t)b * (K / group) * 16 + i;
    /* a chunk's 8 columns share a group (groups are multiples of 8 columns) */
    for (int g0 = 0; g0 < kn; g0 += group) {
        int ge = g0 + group < kn ? g0 + group : kn;
        float s = sb[(int64_t)((k0 + g0) / group) * 16];
        const uint8_t *p = wb + (int64_t)((k0 + g0) / 8) * 64 + 4 * i;
        for (int k = g0; k < ge; k += 8, p += 64) {
            uint32_t d;
            memcpy(&d, p, 4); /* word 0: columns 2j (nibble j), word 1: columns 2j + 1 */
            for (int t = 0; t < 8; t++) row[k + t] = (float)((int)((d >> (16 * (t & 1) + 4 * (t >> 1))) & 15) - 8) * s;
        }
    }
}

void hs_dequant_rows(const void *w, int kind, const float *scale, int group, int K, int n0, int n1, void *dst,
                     int bf16) {
#pragma omp parallel for schedule(static) if (n1 - n0 >= 8)
    for (int n = n0; n < n1; n++) {
        float row[KC];
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kn = K - k0 < KC ? K - k0 : KC;
            if (kind == 5) {
                dequant_x16((const uint8_t *)w, scale, group, K, n, k0, kn, row);
            } else if (kind == 2) {
                const int8_t *r = (const int8_t *)w + (int64_t)n * K + k0;
                float s = scale[n];
#pragma omp simd
                for (int k = 0; k < kn; k++) row[k] = (float)r[k] * s;
            } else {
                const uint8_t *r = (const uint8_t *)w + (int64_t)n * (K / 2) + k0 / 2;
                const float *s = scale + (int64_t)n * (K / group) + k0 / group;
                for (int b = 0; b < kn / 32; b++) {
                    const uint8_t *by = r + b * 16;
                    float *o = row + b * 32;
#pragma omp simd
                    for (int j = 0; j < 16; j++) {
                        o[j] = (float)((int)(by[j] & 15) - 8);
                        o[j + 16] = (float)((int)(by[j] >> 4) - 8);
                    }
                }
                for (int k = 0; k < kn; k += group < kn ? group : kn) {
                    float sg = s[k / group];
                    int ke = k + group < kn ? k + group : kn;
#pragma omp simd
                    for (int j = k; j < ke; j++) row[j] *= sg;
                }
            }
            row_from_f32(dst, (int64_t)(n - n0) * K + k0, kn, bf16, row);
        }
    }
}
