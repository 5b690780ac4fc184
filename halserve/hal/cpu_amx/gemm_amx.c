/* y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for bf16 W on AMX tiles, M = 2..128 (batched decode).
 *
 * A batched decode step is a skinny GEMM: every weight byte should be read from memory once
 * for all rows, and the multiply-adds (M x the GEMV's) must not bound it. The roles are
 * swapped so W needs no repacking: TDPBF16PS's A operand is 16 rows x 32 bf16, which is
 * exactly a block of W as stored ([N][K] row-major, row stride K), and its B operand (pairs
 * of k as rows, 16 columns) is x transposed into the VNNI pair layout, which is small and
 * made once per call. The product tile is y^T: 16 output features x 16 rows of x.
 *
 * Work is split over blocks of 16 output features (32 for M <= 32 on pools of <= 4 threads:
 * amx_rows) across the pool (W streamed once, a block at a time to whichever thread is free);
 * within a 32-row block, 2 W tiles x 2 x tiles feed 4 accumulators per 32-wide k step; a
 * 16-row block's one W tile feeds 4 x tiles (64 rows of x) per k step, so W is loaded once for
 * up to 64 rows. The K tail (K % 32) and the N tail (N % 16) read from zero-padded copies.
 * fp32 x is split into hi + lo bf16 terms (x = hi + lo to ~2^-16 relative), each meeting the
 * same W tile, so an fp32 activation is not rounded to bf16.
 * Not batch-invariant (a row's sums depend on the tile schedule): batch-invariant mode
 * keeps the C GEMV kernels. Builds without AMX export the entry as a stub returning -1. */
#include "common.h"
#include <omp.h>
#include <stdlib.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>

#define MC 16 /* x rows per tile */
#define KB 32 /* k per tile step (16 pairs) */

/* x [M][K] (bf16 or the hi/lo split of fp32) -> B blocks [mc][kb][16 pairs][16 rows][2],
 * zero past M and K; a block is the 16 x 16 transpose of (row, pair) 32-bit units */
static void pack_block(const void *x, int x_bf16, int M, int K, int mc, int kb, uint32_t *hi, uint32_t *lo) {
    if (x_bf16 && (kb + 1) * KB <= K) {
        /* whole k step: pair r of the block's rows is one 16-lane gather (byte offsets m K * 2),
         * lanes past M masked to zero */
        int rows = M - mc * MC < MC ? M - mc * MC : MC;
        __mmask16 valid = (__mmask16)((1u << rows) - 1u);
        const bf16_t *b = (const bf16_t *)x + (int64_t)mc * MC * K + kb * KB;
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(K));
        for (int r = 0; r < 16; r++)
            _mm512_storeu_si512((void *)(hi + r * MC),
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, idx, (const void *)(b + 2 * r), 2));
        return;
    }
    for (int r = 0; r < 16; r++)
        for (int m = 0; m < MC; m++) {
            int row = mc * MC + m, k = kb * KB + 2 * r;
            uint32_t h = 0, l = 0;
            for (int j = 0; j < 2; j++) {
                if (row >= M || k + j >= K) continue;
                if (x_bf16) {
                    h |= (uint32_t)((const bf16_t *)x)[(int64_t)row * K + k + j] << (16 * j);
                } else {
                    float v = ((const float *)x)[(int64_t)row * K + k + j];
                    bf16_t vh = f32_to_bf16(v);
                    float r = v - bf16_to_f32(vh);
                    if (!isfinite(r)) {
                        /* inf or NaN x: lo 0 (inf - inf would make the product NaN where
                         * torch's is inf); a finite x that rounds up to inf: hi truncated */
                        hs_bits bv = {.f = v};
                        if (isfinite(v)) vh = (bf16_t)(bv.u >> 16);
                        r = isfinite(v) ? v - bf16_to_f32(vh) : 0.f;
                    }
                    h |= (uint32_t)vh << (16 * j);
                    l |= (uint32_t)f32_to_bf16(r) << (16 * j);
                }
            }
            hi[r * MC + m] = h;
            if (lo) lo[r * MC + m] = l;
        }
}

/* software prefetch distance (bytes) ahead of each W row's stream on a block's first pass
 * (0: off); a block's 32 rows are 32 concurrent streams, as many as the L2 streamer tracks */
static int amx_pf = 512, amx_pf_l2 = 0, amx_pf_next = 0, amx_pf_seq = -1;
/* flags 1: prefetch into L2 only (T1): no L1 fill buffer held per line, so a core can have
 * more lines in flight than its ~16 fill buffers allow; 2: also the next block's first
 * ``bytes`` of each row, at the start of a block; 4: the whole block this thread takes next
 * into L2 in address order while this one runs (prefetch_next); 16: not that; neither 4 nor
 * 16 (the default): prefetch_next with 32-row blocks, not with 16-row ones. 32-row blocks' 32 row streams outrun the L2 streamer; this 2-vCPU box
 * (2 threads, 1 GB of 1.1B weights cycled, bench/device/amxb_kernels.py, 2026-12-05): 32-row
 * blocks 3.39 -> 3.21 ms a layer at M = 32 with it, 16-row ones unchanged (3.36 / 3.38); the
 * 32-sequence decode end to end 334 -> 351 tok/s. */
void hs_set_amx_prefetch(int bytes, int flags) {
    amx_pf = bytes > 0 ? bytes : 0;
    amx_pf_l2 = (flags & 1) != 0;
    amx_pf_next = (flags & 2) != 0;
    amx_pf_seq = (flags & 4) ? 1 : (flags & 16) ? 0 : -1;
}

/* the next block's bytes [kb * step, (kb + 1) * step) into L2, in address order: spread over the
 * current block's whole k steps, the next block (all but its last K % 32 columns' worth of
 * bytes) arrives as one sequential stream (its rows are contiguous) while this one computes */
static inline void prefetch_next(const char *nxt, int64_t nbytes, int kb, int step) {
    int64_t o = (int64_t)kb * step, e = o + step < nbytes ? o + step : nbytes;
    for (; o < e; o += 64) _mm_prefetch(nxt + o, _MM_HINT_T1);
}

/* 16 W rows from p, amx_pf bytes ahead along each row's stream, into L1 (or L2 only with amx_pf_l2) */
static inline void prefetch_w(const bf16_t *p, int64_t lda) {
    if (amx_pf_l2)
        for (int i = 0; i < 16; i++) _mm_prefetch((const char *)(p + i * lda) + amx_pf, _MM_HINT_T1);
    else
        for (int i = 0; i < 16; i++) _mm_prefetch((const char *)(p + i * lda) + amx_pf, _MM_HINT_T0);
}

/* W rows per block: 32 (two W tiles share each x tile load), 16 (one W tile meets up to 4 x
 * chunks: block4), or 0 (default: AMX_FEW_THREADS below). With W in cache, one thread:
 * 16-row blocks beat 32 by 1.25x at 48 rows, 1.3x at 64, 2x at 128 (the 32-row block passes
 * over its W again per further 32 rows). At 2..32 rows the AMX host's kernel table (16
 * threads, 2026-12-05, bench/device/amxb_kernels.py) had 16-row blocks 5-21% faster on every
 * 1.1B shape but two ties (twice the blocks to share among 16 threads); this 2-vCPU box, 1 GB
 * of weights cycled, without prefetch_next: ties up to 16 rows, 2-8% faster at 32, 5-13% at 48. */
static int amx_rows = 0;
void hs_set_amx_rows(int rows) { amx_rows = rows == 16 || rows == 32 ? rows : 0; }
/* the default block rows: 32 (with the next block prefetched) for up to 32 rows of x on a pool
 * of up to 4 threads, else 16. The two machines measured disagree, and the pool size is what
 * separates them: on the AMX host's 16 threads 16-row blocks were 5-21% faster (above); on
 * this 2-vCPU box, 2 threads, 32-row blocks with prefetch_next were 3-5% faster at M = 2..32
 * in the kernel table (a tie at 64) and the 32-sequence decode ran 351-360 tok/s against
 * 329-338 with 16-row blocks (2026-12-05, bench/device/amx_ab.py, alternating). */
#define AMX_FEW_THREADS 4

/* the first popcount(k) lanes of v as bfloat16, rounded as f32_to_bf16 does */
static inline void store_bf16x16_mask(bf16_t *p, __m512 v, __mmask16 k) {
    _mm256_mask_storeu_epi16((void *)p, k, hs_bf16x16_round(v));
}

/* how the W blocks go to the threads: 1 (default) one block at a time to whichever thread is
 * free, so a thread the OS has descheduled (a shared machine, a server's other threads) holds
 * back one block, not its 1/threads share of the call; 0 the even static split. A W row of a
 * 2048-wide layer is one 4 KB page, which the hardware prefetcher does not cross anyway, so
 * contiguous runs across blocks buy little. */
static int amx_dyn = 1;
void hs_set_amx_sched(int dynamic) { amx_dyn = dynamic != 0; }

/* a 16-row block (one W tile) against up to 4 x chunks at once: 4 accumulators, so each W
 * tile is loaded once for 64 rows of x (M > 32 with 32-row blocks passes over the block's W
 * again from L2 per further pair of chunks, while the DRAM stream waits) */
#define X4(T, X, U)                                                                    \
    if (U < cnt) {                                                                     \
        _tile_loadd(X, xb + ((int64_t)(mc + U) * nkb + kb) * 256, 64);                 \
        _tile_dpbf16ps(T, 4, X);                                                       \
    }

static void block4(const bf16_t *a0, int64_t lda, const bf16_t *tail, int kfull, int nkb, const uint32_t *xh,
                   const uint32_t *xl, int nmc, int n0, int nr, int M, int N, const float *bias, void *y,
                   int y_bf16, const char *nxt, int64_t nxt_bytes) {
    float out[16 * 16];
    const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
    __mmask16 km = (__mmask16)((1u << nr) - 1u);
    for (int mc = 0; mc < nmc; mc += 4) {
        int cnt = nmc - mc < 4 ? nmc - mc : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int kb = 0; kb < nkb; kb++) {
            const bf16_t *p0;
            int64_t st;
            if (kb < kfull) {
                p0 = a0 + kb * KB;
                st = lda * 2;
                if (mc == 0 && amx_pf) prefetch_w(p0, lda);
                if (mc == 0 && nxt) prefetch_next(nxt, nxt_bytes, kb, nr * 64);
            } else {
                p0 = tail;
                st = KB * 2;
            }
            _tile_loadd(4, p0, st);
            for (int s = 0; s < (xl ? 2 : 1); s++) {
                const uint32_t *xb = s ? xl : xh; /* the lo pass meets the same W tile */
                X4(0, 5, 0)
                X4(1, 6, 1)
                X4(2, 7, 2)
                X4(3, 5, 3)
            }
        }
        for (int u = 0; u < cnt; u++) {
            AMX_STORE_ACC(u, out)
            /* out[i][j]: feature n0 + i, x row (mc + u) * 16 + j */
            for (int j = 0; j < MC; j++) {
                int m = (mc + u) * MC + j;
                if (m >= M) break;
                __m512 v = _mm512_i32gather_ps(col, out + j, 4);
                if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(km, bias + n0));
                if (y_bf16) store_bf16x16_mask((bf16_t *)y + (int64_t)m * N + n0, v, km);
                else _mm512_mask_storeu_ps((float *)y + (int64_t)m * N + n0, km, v);
            }
        }
    }
}

static __thread void *xp_buf;
static __thread int64_t xp_cap;

/* one block: rows [n0, n0 + 32) of W (a[0], a[1]: the two 16-row tiles' bases, stride lda
 * elements; a[1] NULL when the block has 16 rows), k steps [0, kfull) from W, then the
 * tail step from tail (32 rows x 32, zero-padded) when K % 32; all x chunks */
static void block(const bf16_t *a0, const bf16_t *a1, int64_t lda, const bf16_t *tail, int kfull, int nkb,
                  const uint32_t *xh, const uint32_t *xl, int nmc, int n0, int nr, int M, int N, const float *bias,
                  void *y, int y_bf16, const char *nxt, int64_t nxt_bytes) {
    if (!a1 && nmc > 2) {
        block4(a0, lda, tail, kfull, nkb, xh, xl, nmc, n0, nr, M, N, bias, y, y_bf16, nxt, nxt_bytes);
        return;
    }
    float out[4][16 * 16];
    for (int mc = 0; mc < nmc; mc += 2) {
        int two = mc + 1 < nmc;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int kb = 0; kb < nkb; kb++) {
            const bf16_t *p0, *p1;
            int64_t st;
            if (kb < kfull) {
                p0 = a0 + kb * KB;
                p1 = a1 ? a1 + kb * KB : NULL;
                st = lda * 2;
                if (mc == 0 && amx_pf) {
                    prefetch_w(p0, lda);
                    if (p1) prefetch_w(p1, lda);
                }
                if (mc == 0 && nxt) prefetch_next(nxt, nxt_bytes, kb, nr * 64);
            } else {
                p0 = tail;
                p1 = a1 ? tail + 16 * KB : NULL;
                st = KB * 2;
            }
            for (int s = 0; s < (xl ? 2 : 1); s++) {
                const uint32_t *xb = s ? xl : xh;
                if (s == 0) { /* the lo pass meets the same W tiles */
                    _tile_loadd(4, p0, st);
                    if (p1) _tile_loadd(5, p1, st);
                }
                _tile_loadd(6, xb + ((int64_t)mc * nkb + kb) * 256, 64);
                if (two) _tile_loadd(7, xb + ((int64_t)(mc + 1) * nkb + kb) * 256, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (two) _tile_dpbf16ps(1, 4, 7);
                if (p1) {
                    _tile_dpbf16ps(2, 5, 6);
                    if (two) _tile_dpbf16ps(3, 5, 7);
                }
            }
        }
        _tile_stored(0, out[0], 64);
        if (two) _tile_stored(1, out[1], 64);
        if (a1) {
            _tile_stored(2, out[2], 64);
            if (two) _tile_stored(3, out[3], 64);
        }
        /* out[2 * ha + hb][i][j]: feature n0 + 16 ha + i, x row (mc + hb) * 16 + j; one
         * 16-lane gather (stride 16 floats) turns a tile column into 16 features of a row */
        const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(16));
        for (int hb = 0; hb < 1 + two; hb++)
            for (int j = 0; j < MC; j++) {
                int m = (mc + hb) * MC + j;
                if (m >= M) break;
                for (int ha = 0; ha * 16 < nr; ha++) {
                    int nv = nr - ha * 16 < 16 ? nr - ha * 16 : 16, n = n0 + ha * 16;
                    __mmask16 k = (__mmask16)((1u << nv) - 1u);
                    __m512 v = _mm512_i32gather_ps(col, out[2 * ha + hb] + j, 4);
                    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + n));
                    if (y_bf16) store_bf16x16_mask((bf16_t *)y + (int64_t)m * N + n, v, k);
                    else _mm512_mask_storeu_ps((float *)y + (int64_t)m * N + n, k, v);
                }
            }
    }
}

int hs_gemm_amx(const void *x, int x_bf16, int M, int K, const bf16_t *w, int N, const float *bias, void *y,
                int y_bf16) {
    if (M < 1 || M > 128 || K < 1 || N < 1) return -1;
    int nmc = (M + MC - 1) / MC, nkb = (K + KB - 1) / KB, kfull = K / KB;
    int64_t blk = (int64_t)nmc * nkb * 256; /* uint32 units per packed x copy */
    int64_t need = blk * (x_bf16 ? 1 : 2);
    if (need > xp_cap) {
        free(xp_buf);
        xp_buf = aligned_alloc(64, (size_t)need * 4);
        xp_cap = xp_buf ? need : 0;
        if (!xp_buf) return -3;
    }
    uint32_t *xh = (uint32_t *)xp_buf, *xl = x_bf16 ? NULL : xh + blk;
    int br = amx_rows ? amx_rows : (M <= 32 && omp_get_max_threads() <= AMX_FEW_THREADS ? 32 : 16);
    int nblk = (N + br - 1) / br;
    int seq = amx_pf_seq >= 0 ? amx_pf_seq : br == 32;
    omp_set_schedule(amx_dyn ? omp_sched_dynamic : omp_sched_static, amx_dyn ? 1 : 0);
    int oom = 0; /* a worker's N-tail buffer could not be had: -3 */
#pragma omp parallel
    {
        amx_config_tiles(8);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (int64_t)nmc * nkb; b++) {
            int mc = (int)(b / nkb), kb = (int)(b % nkb);
            pack_block(x, x_bf16, M, K, mc, kb, xh + b * 256, xl ? xl + b * 256 : NULL);
        }
        bf16_t *pad = NULL; /* the N tail's rows, zero-padded to 16 x nkb * 32 */
        bf16_t tail[32 * KB];
#pragma omp for schedule(runtime)
        for (int b = 0; b < nblk; b++) {
            int n0 = b * br, nr = N - n0 < br ? N - n0 : br;
            if (amx_pf && amx_pf_next && b + 1 < nblk) {
                /* the next block's first lines (the in-block prefetch starts amx_pf bytes in):
                 * into L2 now, so the next block does not open with demand misses */
                int nn = N - n0 - br < br ? N - n0 - br : br, lim = amx_pf < K * 2 ? amx_pf : K * 2;
                const char *nb = (const char *)(w + (int64_t)(n0 + br) * K);
                for (int i = 0; i < nn; i++)
                    for (int off = 0; off < lim; off += 64) _mm_prefetch(nb + (int64_t)i * K * 2 + off, _MM_HINT_T1);
            }
            const char *nxt = NULL;
            int64_t nxt_bytes = 0;
            if (seq) { /* the block this thread most likely takes next (blocks go out in turn) */
                int bn = b + (amx_dyn ? omp_get_num_threads() : 1);
                if (bn < nblk) {
                    nxt = (const char *)(w + (int64_t)bn * br * K);
                    nxt_bytes = (int64_t)(N - bn * br < br ? N - bn * br : br) * K * 2;
                }
            }
            const bf16_t *a0 = w + (int64_t)n0 * K, *a1 = nr > 16 ? a0 + (int64_t)16 * K : NULL;
            int64_t lda = K;
            int kf = kfull;
            /* a partial 16-row tile: its rows copied into a zero-padded buffer */
            int part = nr & 15;
            const bf16_t *src = w + (int64_t)(n0 + (nr & ~15)) * K;
            if (part) {
                if (!pad) pad = (bf16_t *)malloc((size_t)16 * nkb * KB * 2);
                if (!pad) {
                    __atomic_store_n(&oom, 1, __ATOMIC_RELAXED);
                    continue;
                }
                memset(pad, 0, (size_t)16 * nkb * KB * 2);
                for (int i = 0; i < part; i++) memcpy(pad + (int64_t)i * nkb * KB, src + (int64_t)i * K, (size_t)K * 2);
                if (nr < 16) a0 = pad;
                else a1 = pad;
            }
            if (K % KB) {
                memset(tail, 0, sizeof tail);
                for (int i = 0; i < nr; i++) {
                    const bf16_t *r = (i < 16 ? a0 + (int64_t)i * (a0 == pad ? nkb * KB : K)
                                              : a1 + (int64_t)(i - 16) * (a1 == pad ? nkb * KB : K));
                    memcpy(tail + i * KB, r + kfull * KB, (size_t)(K - kfull * KB) * 2);
                }
            }
            if (part) {
                /* the padded copy has whole k steps; the tail buffer serves the full tile */
                if (a0 == pad) {
                    lda = nkb * KB;
                    kf = nkb;
                }
            }
            if (a0 == pad || a1 != pad || !part) {
                block(a0, a1, lda, tail, kf, nkb, xh, xl, nmc, n0, nr, M, N, bias, y, y_bf16, nxt, nxt_bytes);
            } else {
                /* a0 from W (stride K, tail buffer), a1 from the pad (stride nkb * 32): two
                 * separate 16-row passes keep one stride per pass */
                block(a0, NULL, K, tail, kfull, nkb, xh, xl, nmc, n0, 16, M, N, bias, y, y_bf16, nxt, nxt_bytes);
                block(pad, NULL, nkb * KB, NULL, nkb, nkb, xh, xl, nmc, n0 + 16, nr - 16, M, N, bias, y, y_bf16,
                      NULL, 0);
            }
        }
        free(pad);
        _tile_release();
    }
    return oom ? -3 : 0;
}
#else
void hs_set_amx_sched(int dynamic) { (void)dynamic; }
void hs_set_amx_prefetch(int bytes, int flags) { (void)bytes, (void)flags; }
void hs_set_amx_rows(int rows) { (void)rows; }
int hs_gemm_amx(const void *x, int x_bf16, int M, int K, const bf16_t *w, int N, const float *bias, void *y,
                int y_bf16) {
    (void)x, (void)x_bf16, (void)M, (void)K, (void)w, (void)N, (void)bias, (void)y, (void)y_bf16;
    return -1;
}
#endif
