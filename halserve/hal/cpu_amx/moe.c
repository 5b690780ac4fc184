/* Fused MoE for a few tokens (decode), any number in batch-invariant mode. Every routed
 * (token, expert) pair runs in one parallel region with one barrier, so all threads stream
 * the routed experts' weights at once even at batch 1:
 *   pairs are grouped by expert (a counting sort), so tokens sharing an expert read it once;
 *   phase 1, items (expert, block of RA intermediate rows): gate and up rows against the
 *     expert's tokens, then silu(gate) * up into the activation rows (the epilogue);
 *   phase 2, items (block of RB hidden rows): every routed expert's down rows against its
 *     activations, weighted and summed per token in ascending expert order (native's
 *     order), written to ``out`` in the model's dtype.
 * Weights: float32 / bfloat16 as stored, or int8 with one scale per output row. A bf16
 * model's intermediates are rounded to bf16 where native rounds them (gate/up, the
 * activation, each expert's output). Scratch is kept per calling thread (no per-call malloc
 * once the largest shape has run). */
#include "gemv.h"
#include <stdlib.h>

#define RA 16 /* intermediate values per phase-1 item: 2 x RA weight rows (gate, up) */
#define RB 16 /* hidden rows per phase-2 item */

static __thread void *buf_pairs, *buf_xf, *buf_act, *buf_sum;
static __thread int64_t cap_pairs, cap_xf, cap_act, cap_sum;
#ifdef __AVX512VNNI__
static __thread void *buf_aq;
static __thread int64_t cap_aq;
#endif

static void *grow(void **buf, int64_t *cap, int64_t bytes) {
    if (bytes > *cap) {
        free(*buf);
        *buf = malloc((size_t)bytes);
        *cap = *buf ? bytes : 0;
    }
    return *buf;
}

static inline float rnd(float v, int rb) { return rb ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* act[i] = rnd(silu(rnd(g[i])) * rnd(u[i])) for n <= RA values */
static inline void silu_mul(const float *g, const float *u, int n, int rb, float *dst) {
    float gg[RA], uu[RA], e[RA];
    for (int i = 0; i < n; i++) {
        gg[i] = rnd(g[i], rb);
        uu[i] = rnd(u[i], rb);
    }
#ifdef __AVX512F__
    if (n == 16) {
        _mm512_storeu_ps(e, hs_exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(gg))));
    } else
#endif
        for (int i = 0; i < n; i++) e[i] = expf(-gg[i]);
    for (int i = 0; i < n; i++) dst[i] = rnd(gg[i] / (1.0f + e[i]) * uu[i], rb);
}

/* One dot call: nt activation rows (xs) against GV_ROWS weight rows (rows, of kind's type). */
typedef struct {
    int kind, dot16, x16; /* dot16: bf16 x and bf16 W through VDPBF16PS; x16: see hs_moe */
} mode_t_;

static inline void dots(mode_t_ m, const void *const *xs, int nt, const void *const *rows, int K,
                        float acc[GV_TOK][GV_ROWS]) {
#ifdef __AVX512BF16__
    if (m.dot16) {
        gv_bf16dot_x((const bf16_t *const *)xs, nt, (const bf16_t *const *)rows, K, acc);
        return;
    }
#endif
    if (m.kind == 1) gv_bf16w_x((const float *const *)xs, nt, (const bf16_t *const *)rows, K, acc);
    else if (m.kind == 2) gv_i8w_x((const float *const *)xs, nt, (const int8_t *const *)rows, K, acc);
    else gv_f32_x((const float *const *)xs, nt, (const float *const *)rows, K, acc);
}

/* x [T, H] (bf16 or fp32), ids / tw [T, topk], w13 [E, 2I, H], w2 [E, H, I] (kind 0 fp32,
 * 1 bf16, 2 int8 with s13 [E, 2I] / s2 [E, H]), out [T, H] in x's dtype. ws13 / ws2 (int8,
 * may be NULL): each row's sum over its first H (I) & ~63 values; with them and bf16 x, the
 * dots take x and the activations as 16-bit fixed point through VPDPBUSD (linear.c's int8 x
 * bf16 form) instead of widening every weight to fp32. The activations get their scale in a
 * short pass between the phases (one more barrier: a row's amax needs all its items).
 * Returns 0, -1 for an unknown kind, -2 for an expert id outside [0, E), -3 out of memory. */
int hs_moe(const void *x, int x_bf16, int T, int H, int I, int E, int topk, const int64_t *ids, const float *tw,
           const void *w13, const float *s13, const int32_t *ws13, const void *w2, const float *s2,
           const int32_t *ws2, int kind, void *out) {
    if (kind < 0 || kind > 2) return -1;
    if (T <= 0 || topk <= 0) return 0; /* nothing routed (a 0-byte malloc may be NULL: not out of memory) */
    int P = T * topk;
    for (int p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= E) return -2;
    mode_t_ m = {kind, 0, 0};
#ifdef __AVX512BF16__
    m.dot16 = kind == 1 && x_bf16;
#endif
    int rb = x_bf16;
    size_t esz = kind == 0 ? 4 : kind == 1 ? 2 : 1, asz = m.dot16 ? 2 : 4;
    /* pairs sorted by expert (stable): order[P]; unique experts ue[U] with their pairs at
     * order[us[u] .. us[u + 1]) */
    int *ib = (int *)grow(&buf_pairs, &cap_pairs, (int64_t)(2 * P + 2 * E + 4) * sizeof(int));
    float *ysum = (float *)grow(&buf_sum, &cap_sum, (int64_t)T * H * 4);
    void *act = grow(&buf_act, &cap_act, (int64_t)P * I * asz);
    const void *xa = x; /* the activation the phase-1 dots read */
    const float *xsc = NULL; /* x16: each token's x scale */
    uint8_t *aq = NULL;      /* x16: the activations' bytes [P, 2I], then their scales [P] */
#ifdef __AVX512VNNI__
    m.x16 = kind == 2 && x_bf16 && ws13 && ws2;
    if (m.x16) {
        char *xq = (char *)grow(&buf_xf, &cap_xf, (int64_t)T * (2 * H + 4));
        aq = (uint8_t *)grow(&buf_aq, &cap_aq, (int64_t)P * (2 * I + 4));
        if (!xq || !aq) return -3;
        float *sc = (float *)(xq + (int64_t)T * 2 * H);
        for (int t = 0; t < T; t++) sc[t] = gv_x16_quant((const bf16_t *)x + (int64_t)t * H, 1, H, (uint8_t *)xq + (int64_t)t * 2 * H);
        xa = xq;
        xsc = sc;
    }
#endif
    if (!m.dot16 && !m.x16 && x_bf16) {
        float *xf = (float *)grow(&buf_xf, &cap_xf, (int64_t)T * H * 4);
        if (!xf) return -3;
        row_to_f32(x, 0, T * H, 1, xf);
        xa = xf;
    }
    if (!ib || !ysum || !act) return -3;
    (void)xsc;
    (void)ws13;
    (void)ws2;
    (void)aq;
    int *order = ib, *cnt = ib + P, *ue = cnt + E + 1, *us = ue + (P < E ? P : E) + 1;
    memset(cnt, 0, (size_t)(E + 1) * sizeof(int));
    for (int p = 0; p < P; p++) cnt[ids[p] + 1]++;
    int U = 0;
    for (int e = 0; e < E; e++) {
        if (cnt[e + 1]) {
            ue[U] = e;
            us[U++] = cnt[e];
        }
        cnt[e + 1] += cnt[e];
    }
    us[U] = P;
    for (int p = 0; p < P; p++) order[cnt[ids[p]]++] = p;

    int nba = (I + RA - 1) / RA, nbb = (H + RB - 1) / RB;
    int64_t xrow = (int64_t)H * (m.dot16 || m.x16 ? 2 : 4);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t it = 0; it < (int64_t)U * nba; it++) {
            int u = (int)(it / nba), i0 = (int)(it % nba) * RA, i1 = i0 + RA < I ? i0 + RA : I;
            int64_t e = ue[u];
            const char *we = (const char *)w13 + (size_t)e * 2 * I * H * esz;
            const float *se = s13 ? s13 + e * 2 * I : NULL;
            for (int c0 = us[u]; c0 < us[u + 1]; c0 += GV_TOK) {
                int nt = us[u + 1] - c0 < GV_TOK ? us[u + 1] - c0 : GV_TOK;
                const void *xs[GV_TOK];
                for (int t = 0; t < GV_TOK; t++)
                    xs[t] = (const char *)xa + (int64_t)(order[c0 + (t < nt ? t : 0)] / topk) * xrow;
                float g[GV_TOK][RA], up[GV_TOK][RA], acc[GV_TOK][GV_ROWS];
                for (int i = i0; i < i1; i += GV_ROWS) {
                    const void *rows[GV_ROWS];
                    int nr = i1 - i < GV_ROWS ? i1 - i : GV_ROWS;
                    for (int half = 0; half < 2; half++) {
                        int64_t r0 = (int64_t)half * I + i;
                        for (int r = 0; r < GV_ROWS; r++) rows[r] = we + (size_t)(r0 + (r < nr ? r : 0)) * H * esz;
                        float (*dst)[RA] = half ? up : g;
#ifdef __AVX512VNNI__
                        if (m.x16) {
                            int32_t ws[GV_ROWS];
                            for (int r = 0; r < GV_ROWS; r++) ws[r] = ws13[e * 2 * I + r0 + (r < nr ? r : 0)];
                            gv_i8x16_x((const uint8_t *const *)xs, nt, (const int8_t *const *)rows, ws, H, acc);
                            for (int t = 0; t < nt; t++) {
                                float xt = xsc[order[c0 + t] / topk];
                                for (int r = 0; r < nr; r++) dst[t][i - i0 + r] = acc[t][r] * xt * se[r0 + r];
                            }
                            continue;
                        }
#endif
                        dots(m, xs, nt, rows, H, acc);
                        for (int t = 0; t < nt; t++)
                            for (int r = 0; r < nr; r++) dst[t][i - i0 + r] = se ? acc[t][r] * se[r0 + r] : acc[t][r];
                    }
                }
                for (int t = 0; t < nt; t++) {
                    int64_t p = order[c0 + t];
                    float a[RA];
                    silu_mul(g[t], up[t], i1 - i0, rb, a);
                    if (m.dot16) row_from_f32(act, p * I + i0, i1 - i0, 1, a);
                    else memcpy((float *)act + p * I + i0, a, (size_t)(i1 - i0) * 4);
                }
            }
        }
#ifdef __AVX512VNNI__
        if (m.x16) {
            float *asc = (float *)(aq + (int64_t)P * 2 * I);
#pragma omp for schedule(static)
            for (int p = 0; p < P; p++) asc[p] = gv_x16_quant((const float *)act + (int64_t)p * I, 0, I, aq + (int64_t)p * 2 * I);
        }
#endif
#pragma omp for schedule(static)
        for (int b = 0; b < nbb; b++) {
            int n0 = b * RB, n1 = n0 + RB < H ? n0 + RB : H;
            for (int t = 0; t < T; t++) memset(ysum + (int64_t)t * H + n0, 0, (size_t)(n1 - n0) * 4);
            for (int u = 0; u < U; u++) {
                int64_t e = ue[u];
                const char *we = (const char *)w2 + (size_t)e * H * I * esz;
                const float *se = s2 ? s2 + e * H : NULL;
                for (int c0 = us[u]; c0 < us[u + 1]; c0 += GV_TOK) {
                    int nt = us[u + 1] - c0 < GV_TOK ? us[u + 1] - c0 : GV_TOK;
                    const void *as[GV_TOK];
                    for (int t = 0; t < GV_TOK; t++)
                        as[t] = (const char *)act + (int64_t)order[c0 + (t < nt ? t : 0)] * I * asz;
                    for (int n = n0; n < n1; n += GV_ROWS) {
                        int nr = n1 - n < GV_ROWS ? n1 - n : GV_ROWS;
                        const void *rows[GV_ROWS];
                        float acc[GV_TOK][GV_ROWS];
                        for (int r = 0; r < GV_ROWS; r++) rows[r] = we + (size_t)(n + (r < nr ? r : 0)) * I * esz;
                        float ascale[GV_TOK] = {1.f, 1.f, 1.f, 1.f};
#ifdef __AVX512VNNI__
                        if (m.x16) {
                            const uint8_t *qs[GV_TOK];
                            int32_t ws[GV_ROWS];
                            for (int t = 0; t < GV_TOK; t++) {
                                int p = order[c0 + (t < nt ? t : 0)];
                                qs[t] = aq + (int64_t)p * 2 * I;
                                ascale[t] = ((const float *)(aq + (int64_t)P * 2 * I))[p];
                            }
                            for (int r = 0; r < GV_ROWS; r++) ws[r] = ws2[e * H + n + (r < nr ? r : 0)];
                            gv_i8x16_x(qs, nt, (const int8_t *const *)rows, ws, I, acc);
                        } else
#endif
                            dots(m, as, nt, rows, I, acc);
                        for (int t = 0; t < nt; t++) {
                            int p = order[c0 + t];
                            float *ys = ysum + (int64_t)(p / topk) * H;
                            for (int r = 0; r < nr; r++) {
                                float y = rnd(se ? acc[t][r] * ascale[t] * se[n + r] : acc[t][r], rb);
                                ys[n + r] += y * tw[p];
                            }
                        }
                    }
                }
            }
            for (int t = 0; t < T; t++)
                row_from_f32(out, (int64_t)t * H + n0, n1 - n0, x_bf16, ysum + (int64_t)t * H + n0);
        }
    }
    return 0;
}
