/* The paged KV cache: write_kv, causal GQA attention over block tables, block copies.
 * Cache layout [2, blocks, block_size, kv_heads, head_dim]; ``half`` is the element offset
 * of the value half. */
#include <stdlib.h>
#include "hs_rvv.h"

/* Slots at or past nslots are skipped and counted (the return value); negative ones are
 * padding, skipped. Returns -3 where a row buffer could not be had. */
int hs_write_kv(const void *key, const void *val, int sdt, int64_t t, int64_t hk, int64_t d,
                int64_t kst, int64_t vst, void *cache, int cdt, int64_t half, const int64_t *slots,
                int64_t nslots) {
    size_t ses = hs_esize(sdt), ces = hs_esize(cdt);
    int64_t row = hk * d;
    int bad = 0, oom = 0;
#pragma omp parallel reduction(+ : bad, oom)
    {
        float *buf = (float *)malloc((size_t)row * sizeof(float));
        oom += !buf;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < t; r++) {
            int64_t s = slots[r];
            if (s < 0 || !buf) continue;
            if (s >= nslots) {
                bad++;
                continue;
            }
            hs_load((const char *)key + (size_t)(r * kst) * ses, sdt, buf, row);
            hs_store(buf, (char *)cache + (size_t)(s * row) * ces, cdt, row);
            hs_load((const char *)val + (size_t)(r * vst) * ses, sdt, buf, row);
            hs_store(buf, (char *)cache + (size_t)(half + s * row) * ces, cdt, row);
        }
        free(buf);
    }
    return oom ? -3 : bad;
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

/* The caller's indices before anything is read through them: 0, or 1 + 4 * seq + what for the
 * first bad sequence (halserve/hal/bounds.py words them; cpu_amx's attention.c the same):
 * what = 0: cu_q not starting at 0, decreasing or past the rows query rows; 1: a context
 * shorter than its query; 2: a context past max_blocks * bs keys; 3: a block id the query
 * reads outside [0, nblocks). One compare a block read. */
static int check_indices(const int32_t *cu_q, const int32_t *seq_lens, const int32_t *tables, int64_t max_blocks,
                         int64_t nseq, int64_t rows, int64_t bs, int64_t window, int64_t nblocks) {
    if (nseq > 0 && cu_q[0] != 0) return 1;
    for (int64_t i = 0; i < nseq; i++) {
        int64_t q0 = cu_q[i], q1 = cu_q[i + 1], slen = seq_lens[i];
        if (q1 < q0 || q1 > rows) return (int)(1 + 4 * i);
        if (slen < q1 - q0) return (int)(2 + 4 * i);
        if (q1 == q0) continue; /* no query row: nothing read */
        if (slen > max_blocks * bs) return (int)(3 + 4 * i);
        int64_t p0 = slen - (q1 - q0), beg = window > 0 && p0 - window + 1 > 0 ? p0 - window + 1 : 0;
        const int32_t *tb = tables + i * max_blocks;
        for (int64_t b = beg / bs; b <= (slen - 1) / bs; b++)
            if (tb[b] < 0 || tb[b] >= nblocks) return (int)(4 + 4 * i);
    }
    return 0;
}

/* Returns 0, check_indices' code (nothing computed), or -3 out of memory. */
int hs_attention(const void *q, int qdt, int64_t qst, int64_t hq, int64_t hk, int64_t d,
                 const void *cache, int cdt, int64_t half, int64_t bs,
                 const int32_t *cu_q, const int32_t *seq_lens, const int32_t *tables, int64_t max_blocks,
                 int64_t nseq, int64_t window, float scale, void *out, int odt, int64_t ost, int64_t rows,
                 int64_t nblocks) {
    int bad = check_indices(cu_q, seq_lens, tables, max_blocks, nseq, rows, bs, window, nblocks);
    if (bad) return bad;
    int64_t t = nseq > 0 ? cu_q[nseq] : 0, maxlen = 1, group = hq / hk;
    size_t qes = hs_esize(qdt), oes = hs_esize(odt);
    int32_t *seq_of = (int32_t *)malloc((size_t)(t > 0 ? t : 1) * sizeof(int32_t));
    if (!seq_of) return -3;
    int oom = 0;
    for (int64_t s = 0; s < nseq; s++) {
        for (int64_t r = cu_q[s]; r < cu_q[s + 1]; r++) seq_of[r] = (int32_t)s;
        if (seq_lens[s] > maxlen) maxlen = seq_lens[s];
    }
#pragma omp parallel reduction(+ : oom)
    {
        float *scores = (float *)malloc((size_t)(maxlen + 3 * d) * sizeof(float));
        float *qf = scores + maxlen, *kbuf = qf + d, *acc = kbuf + d;
        oom += !scores;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < t * hq; item++) {
            if (!scores) continue;
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
    return oom ? -3 : 0;
}

/* strides in bytes: a staging buffer [n, 2, ...] arrives transposed, so the halves and
 * blocks of either side may interleave; each block itself is contiguous. A pair naming a
 * block outside [0, src_blocks) / [0, dst_blocks) is skipped and counted: the return value. */
int hs_copy_blocks(const void *src, void *dst, int64_t src_half, int64_t src_block, int64_t dst_half,
                   int64_t dst_block, int64_t block_bytes, const int64_t *map, int64_t n, int64_t src_blocks,
                   int64_t dst_blocks) {
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t i = 0; i < 2 * n; i++) {
        int64_t r = i / 2, kv = i % 2;
        if (map[2 * r] < 0 || map[2 * r] >= src_blocks || map[2 * r + 1] < 0 || map[2 * r + 1] >= dst_blocks) {
            bad += kv == 0; /* a pair once */
            continue;
        }
        memcpy((char *)dst + kv * dst_half + map[2 * r + 1] * dst_block,
               (const char *)src + kv * src_half + map[2 * r] * src_block, (size_t)block_bytes);
    }
    return bad;
}
