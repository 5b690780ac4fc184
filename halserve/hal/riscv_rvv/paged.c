/* The paged KV cache: write_kv, causal GQA attention over block tables, block copies.
 * Cache layout [2, blocks, block_size, kv_heads, head_dim]; ``half`` is the element offset
 * of the value half. */
#include <stdlib.h>
#include "hs_rvv.h"

void hs_write_kv(const void *key, const void *val, int sdt, int64_t t, int64_t hk, int64_t d,
                 int64_t kst, int64_t vst, void *cache, int cdt, int64_t half, const int64_t *slots) {
    size_t ses = hs_esize(sdt), ces = hs_esize(cdt);
    int64_t row = hk * d;
#pragma omp parallel
    {
        float *buf = (float *)malloc((size_t)row * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < t; r++) {
            int64_t s = slots[r];
            if (s < 0) continue;
            hs_load((const char *)key + (size_t)(r * kst) * ses, sdt, buf, row);
            hs_store(buf, (char *)cache + (size_t)(s * row) * ces, cdt, row);
            hs_load((const char *)val + (size_t)(r * vst) * ses, sdt, buf, row);
            hs_store(buf, (char *)cache + (size_t)(half + s * row) * ces, cdt, row);
        }
        free(buf);
    }
}

/* One (query token, query head): scores for keys lo..hi, softmax, weighted sum of values. */
static void attend(const float *q, const char *cache, int cdt, int64_t half, int64_t bs, int64_t hk,
                   int64_t d, int64_t kvh, const int32_t *table, int64_t lo, int64_t hi, float scale,
                   float *scores, float *kbuf, float *acc) {
    size_t ces = hs_esize(cdt);
    float mx = -INFINITY;
    for (int64_t j = lo; j <= hi; j++) {
        int64_t slot = (int64_t)table[j / bs] * bs + j % bs;
        hs_load(cache + (size_t)((slot * hk + kvh) * d) * ces, cdt, kbuf, d);
        float s = hs_dot(q, kbuf, d) * scale;
        scores[j - lo] = s;
        if (s > mx) mx = s;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j <= hi - lo; j++) { scores[j] = expf(scores[j] - mx); sum += scores[j]; }
    memset(acc, 0, (size_t)d * sizeof(float));
    for (int64_t j = lo; j <= hi; j++) {
        int64_t slot = (int64_t)table[j / bs] * bs + j % bs;
        hs_load(cache + (size_t)(half + (slot * hk + kvh) * d) * ces, cdt, kbuf, d);
        hs_axpy(acc, scores[j - lo], kbuf, d);
    }
    hs_scal(acc, 1.0f / sum, d);
}

void hs_attention(const void *q, int qdt, int64_t qst, int64_t hq, int64_t hk, int64_t d,
                  const void *cache, int cdt, int64_t half, int64_t bs,
                  const int32_t *cu_q, const int32_t *seq_lens, const int32_t *tables, int64_t max_blocks,
                  int64_t nseq, int64_t window, float scale, void *out, int odt, int64_t ost) {
    int64_t t = cu_q[nseq], maxlen = 1, group = hq / hk;
    size_t qes = hs_esize(qdt), oes = hs_esize(odt);
    int32_t *seq_of = (int32_t *)malloc((size_t)(t > 0 ? t : 1) * sizeof(int32_t));
    for (int64_t s = 0; s < nseq; s++) {
        for (int64_t r = cu_q[s]; r < cu_q[s + 1]; r++) seq_of[r] = (int32_t)s;
        if (seq_lens[s] > maxlen) maxlen = seq_lens[s];
    }
#pragma omp parallel
    {
        float *scores = (float *)malloc((size_t)(maxlen + 3 * d) * sizeof(float));
        float *qf = scores + maxlen, *kbuf = qf + d, *acc = kbuf + d;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < t * hq; item++) {
            int64_t r = item / hq, h = item % hq, s = seq_of[r];
            int64_t qlen = cu_q[s + 1] - cu_q[s], slen = seq_lens[s];
            int64_t p = slen - qlen + (r - cu_q[s]);
            int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            hs_load((const char *)q + (size_t)(r * qst + h * d) * qes, qdt, qf, d);
            attend(qf, (const char *)cache, cdt, half, bs, hk, d, h / group, tables + s * max_blocks,
                   lo, p, scale, scores, kbuf, acc);
            hs_store(acc, (char *)out + (size_t)(r * ost + h * d) * oes, odt, d);
        }
        free(scores);
    }
    free(seq_of);
}

/* strides in bytes: a staging buffer [n, 2, ...] arrives transposed, so the halves and
 * blocks of either side may interleave; each block itself is contiguous */
void hs_copy_blocks(const void *src, void *dst, int64_t src_half, int64_t src_block, int64_t dst_half,
                    int64_t dst_block, int64_t block_bytes, const int64_t *map, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < 2 * n; i++) {
        int64_t r = i / 2, kv = i % 2;
        memcpy((char *)dst + kv * dst_half + map[2 * r + 1] * dst_block,
               (const char *)src + kv * src_half + map[2 * r] * src_block, (size_t)block_bytes);
    }
}
