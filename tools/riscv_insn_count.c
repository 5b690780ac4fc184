/* Drives one riscv_rvv kernel once on fixed shapes, for dynamic instruction counts under
 * qemu (tools/riscv_insn_count.sh): linked statically with the kernel sources, built once
 * with RVV (-march=rv64gcv) and once scalar (-march=rv64gc). "none" runs only the set-up,
 * the baseline subtracted from every op. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "hs_rvv.h"

static float *frand(int64_t n) {
    float *p = (float *)malloc((size_t)n * sizeof(float));
    uint32_t s = 12345;
    for (int64_t i = 0; i < n; i++) { s = s * 1664525u + 1013904223u; p[i] = (float)(s >> 8) / 16777216.0f - 0.5f; }
    return p;
}

static uint16_t *bf(const float *x, int64_t n) {
    uint16_t *p = (uint16_t *)malloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++) p[i] = hs_f2bf(x[i]);
    return p;
}

int main(int argc, char **argv) {
    const char *op = argc > 1 ? argv[1] : "none";
    enum { M = 1, K = 512, N = 256, T = 4, H = 512, D = 64, HQ = 4, HK = 2, BS = 16, L = 128, V = 4096 };
    float *x = frand(T * H * 2), *w = frand(N * K), *y = frand(T * H * 2), *g = frand(H);
    uint16_t *wb = bf(w, N * K), *xb = bf(x, T * H * 2), *yb = bf(y, T * H * 2);
    int8_t *wq = (int8_t *)malloc(N * K);
    for (int i = 0; i < N * K; i++) wq[i] = (int8_t)(w[i] * 250);
    float *sc = frand(N);
    int64_t half = 8 * BS * HK * D;
    float *cache = frand(2 * half), *q = frand(HQ * D), *o = frand(HQ * D);
    int32_t cu[2] = {0, 1}, lens[1] = {L}, table[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    /* every op's inputs are made before the op runs, so the baseline covers them */
    float *rope = frand(128 * D), *lg = frand(8), *w13 = frand(8 * 2 * 64 * 128), *w2 = frand(8 * 128 * 64);
    float *logits = frand(V);
    uint16_t *gb = bf(g, H);
    if (!strcmp(op, "linear_f32")) hs_linear(x, 0, M, K, K, w, 0, N, NULL, 0, NULL, y, 0);
    else if (!strcmp(op, "linear_bf16")) hs_linear(xb, 1, M, K, K, wb, 1, N, NULL, 0, NULL, yb, 1);
    else if (!strcmp(op, "linear_int8")) hs_linear(x, 0, M, K, K, wq, 3, N, sc, 1, NULL, y, 0);
    else if (!strcmp(op, "rms_norm")) hs_rms_norm(x, y, g, 0, T, H, H, H, 1e-5f, x + T * H, y + T * H);
    else if (!strcmp(op, "rms_norm_bf16")) hs_rms_norm(xb, NULL, gb, 1, T, H, H, H, 1e-5f, yb, NULL);
    else if (!strcmp(op, "silu_and_mul")) hs_silu_and_mul(x, 0, T, H, 2 * H, y);
    else if (!strcmp(op, "rotary")) {
        int64_t pos[T] = {1, 7, 30, 99};
        hs_rotary(pos, x, y, 0, T, HQ, HK, D, HQ * D, HK * D, rope, D, 1, 128);
    } else if (!strcmp(op, "write_kv")) {
        int64_t slots[T] = {3, 17, -1, 40};
        hs_write_kv(x, y, 0, T, HK, D, HK * D, HK * D, cache, 0, half, slots, 8 * BS);
    } else if (!strcmp(op, "attention_decode")) {
        hs_attention(q, 0, HQ * D, HQ, HK, D, cache, 0, half, BS, cu, lens, table, 8, 1, 0, 0.125f, o, 0, HQ * D, 1, 8);
    } else if (!strcmp(op, "moe")) {
        hs_moe(x, 0, 1, 128, lg, 8, w13, 0, NULL, w2, NULL, 64, 0, 2, 0, 1, 1, 1, NULL, 1.0f, y);
    } else if (!strcmp(op, "sample")) {
        float t = 0.8f, tp = 0.9f, mp = 0.0f;
        int32_t tk = 50;
        int64_t sd = 7, st = 3, out = 0;
        hs_sample(logits, 1, V, &t, &tk, &tp, &mp, &sd, &st, &out);
    } else if (strcmp(op, "none")) { fprintf(stderr, "unknown op %s\n", op); return 2; }
    printf("%s %f\n", op, (double)y[0] + (double)o[0]);
    return 0;
}
