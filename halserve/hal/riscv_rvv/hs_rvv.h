/* halserve riscv_rvv kernels: the C ABI (between the ABI markers, read by cffi) and the
 * shared vector helpers. One source, two builds: RVV 1.0 intrinsics (vector-length
 * agnostic: every loop asks vsetvl, so any VLEN from 128 to 1024 bits is correct) when
 * __riscv_v_intrinsic is defined, portable scalar C otherwise.
 *
 * dtype codes: 0 float32, 1 bfloat16, 2 float16, 3 int8 (weights only).
 * Strides are in elements. Every kernel computes in float32. */
#ifndef HS_RVV_H
#define HS_RVV_H
#include <stdint.h>
#include <stddef.h>

/* ABI BEGIN */
int hs_build_info(void);   /* bit 0: RVV build, bit 1: OpenMP; >> 8: VLEN in bits (0 scalar) */
void hs_set_threads(int n);
void hs_linear(const void *x, int xdt, int64_t m, int64_t k, int64_t ldx,
               const void *w, int wdt, int64_t n, const float *scale, int per_channel,
               const void *bias, void *y, int ydt);
void hs_rms_norm(const void *x, const void *res, const void *w, int dt, int64_t t, int64_t h,
                 int64_t ldx, int64_t ldr, float eps, void *out, void *hout);
void hs_silu_and_mul(const void *x, int dt, int64_t t, int64_t i, int64_t ldx, void *out);
/* rotary, write_kv, attention, copy_blocks take the bounds of the indices they are passed
 * (positions, slots, block ids, lengths) and skip what is outside: > 0 says what was
 * (halserve/hal/bounds.py), -3 out of memory, 0 done */
int hs_rotary(const int64_t *pos, void *q, void *k, int dt, int64_t t, int64_t hq, int64_t hk,
              int64_t d, int64_t qst, int64_t kst, const float *cache, int64_t rot, int neox, int64_t npos);
int hs_write_kv(const void *key, const void *val, int sdt, int64_t t, int64_t hk, int64_t d,
                int64_t kst, int64_t vst, void *cache, int cdt, int64_t half, const int64_t *slots,
                int64_t nslots);
int hs_attention(const void *q, int qdt, int64_t qst, int64_t hq, int64_t hk, int64_t d,
                 const void *cache, int cdt, int64_t half, int64_t bs,
                 const int32_t *cu_q, const int32_t *seq_lens, const int32_t *tables, int64_t max_blocks,
                 int64_t nseq, int64_t window, float scale, void *out, int odt, int64_t ost, int64_t rows,
                 int64_t nblocks);
void hs_moe(const void *x, int dt, int64_t t, int64_t h, const float *logits, int64_t e,
            const void *w13, int wdt, const float *s13, const void *w2, const float *s2, int64_t inter,
            int per_channel, int top_k, int scoring, int renorm, int groups, int topk_group,
            const float *bias, float routed_scale, void *out);
int hs_copy_blocks(const void *src, void *dst, int64_t src_half, int64_t src_block, int64_t dst_half,
                   int64_t dst_block, int64_t block_bytes, const int64_t *map, int64_t n, int64_t src_blocks,
                   int64_t dst_blocks);
void hs_sample(const float *logits, int64_t b, int64_t v, const float *temp, const int32_t *top_k,
               const float *top_p, const float *min_p, const int64_t *seeds, const int64_t *steps,
               int64_t *out);
/* ABI END */

#include <string.h>
#include <math.h>
#ifdef __riscv_v_intrinsic
#include <riscv_vector.h>
#endif
#ifdef _OPENMP  /* declared here: a cross sysroot may lack the runtime's omp.h */
void omp_set_num_threads(int n);
#endif

enum { HS_F32 = 0, HS_BF16 = 1, HS_F16 = 2, HS_I8 = 3 };

static inline size_t hs_esize(int dt) { return dt == HS_F32 ? 4 : dt == HS_I8 ? 1 : 2; }

static inline float hs_bits2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t hs_f2bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float hs_bf2f(uint16_t h) { return hs_bits2f((uint32_t)h << 16); }
static inline uint16_t hs_f2bf(float f) {  /* round to nearest even, as torch */
    uint32_t u = hs_f2bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float hs_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, ex = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (ex == 0) {
        float f = (float)man * (1.0f / 16777216.0f);  /* subnormal: man * 2^-24, exact */
        return hs_bits2f(hs_f2bits(f) | sign);
    }
    if (ex == 31) return hs_bits2f(sign | 0x7f800000u | (man << 13));
    return hs_bits2f(sign | ((ex + 112u) << 23) | (man << 13));
}
static inline uint16_t hs_f2h(float f) {  /* round to nearest even */
    uint32_t x = hs_f2bits(f), sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   /* >= 65520 rounds to inf */
    if (x < 0x38800000u) {                                     /* below 2^-14: subnormal */
        float a = hs_bits2f(x) * 16777216.0f;                   /* exact power-of-two scale */
        return (uint16_t)(sign | (uint32_t)lrintf(a));
    }
    uint32_t u = x - 0x38000000u;
    u += 0xfffu + ((u >> 13) & 1u);
    return (uint16_t)(sign | (u >> 13));
}

/* n values of dtype dt at src -> float32 dst */
static inline void hs_load(const void *src, int dt, float *dst, int64_t n) {
    if (dt == HS_F32) { memcpy(dst, src, (size_t)n * 4); return; }
    if (dt == HS_BF16) {
        const uint16_t *s = (const uint16_t *)src;
#ifdef __riscv_v_intrinsic
        for (int64_t i = 0; i < n;) {
            size_t vl = __riscv_vsetvl_e16m2((size_t)(n - i));
            vuint32m4_t w = __riscv_vwcvtu_x_x_v_u32m4(__riscv_vle16_v_u16m2(s + i, vl), vl);
            w = __riscv_vsll_vx_u32m4(w, 16, vl);
            __riscv_vse32_v_f32m4(dst + i, __riscv_vreinterpret_v_u32m4_f32m4(w), vl);
            i += (int64_t)vl;
        }
#else
        for (int64_t i = 0; i < n; i++) dst[i] = hs_bf2f(s[i]);
#endif
        return;
    }
    if (dt == HS_F16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = hs_h2f(s[i]);
        return;
    }
    {
        const int8_t *s = (const int8_t *)src;
#ifdef __riscv_v_intrinsic
        for (int64_t i = 0; i < n;) {
            size_t vl = __riscv_vsetvl_e8m1((size_t)(n - i));
            vint32m4_t w = __riscv_vsext_vf4_i32m4(__riscv_vle8_v_i8m1(s + i, vl), vl);
            __riscv_vse32_v_f32m4(dst + i, __riscv_vfcvt_f_x_v_f32m4(w, vl), vl);
            i += (int64_t)vl;
        }
#else
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i];
#endif
    }
}

/* float32 src -> n values of dtype dt at dst (round to nearest even) */
static inline void hs_store(const float *src, void *dst, int dt, int64_t n) {
    if (dt == HS_F32) { memcpy(dst, src, (size_t)n * 4); return; }
    uint16_t *d = (uint16_t *)dst;
    if (dt == HS_BF16) for (int64_t i = 0; i < n; i++) d[i] = hs_f2bf(src[i]);
    else for (int64_t i = 0; i < n; i++) d[i] = hs_f2h(src[i]);
}

/* a value rounded through dtype dt and back (what storing then reloading gives) */
static inline float hs_round(float f, int dt) {
    return dt == HS_BF16 ? hs_bf2f(hs_f2bf(f)) : dt == HS_F16 ? hs_h2f(hs_f2h(f)) : f;
}

static inline float hs_dot(const float *a, const float *b, int64_t n) {
#ifdef __riscv_v_intrinsic
    size_t vlmax = __riscv_vsetvlmax_e32m4();
    vfloat32m4_t acc = __riscv_vfmv_v_f_f32m4(0.0f, vlmax);
    for (int64_t i = 0; i < n;) {
        size_t vl = __riscv_vsetvl_e32m4((size_t)(n - i));
        acc = __riscv_vfmacc_vv_f32m4_tu(acc, __riscv_vle32_v_f32m4(a + i, vl),
                                         __riscv_vle32_v_f32m4(b + i, vl), vl);
        i += (int64_t)vl;
    }
    vfloat32m1_t z = __riscv_vfmv_s_f_f32m1(0.0f, 1);
    return __riscv_vfmv_f_s_f32m1_f32(__riscv_vfredusum_vs_f32m4_f32m1(acc, z, vlmax));
#else
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; i++, j++) s[j] += a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
#endif
}

/* y += a * x */
static inline void hs_axpy(float *y, float a, const float *x, int64_t n) {
#ifdef __riscv_v_intrinsic
    for (int64_t i = 0; i < n;) {
        size_t vl = __riscv_vsetvl_e32m8((size_t)(n - i));
        vfloat32m8_t vy = __riscv_vle32_v_f32m8(y + i, vl);
        vy = __riscv_vfmacc_vf_f32m8(vy, a, __riscv_vle32_v_f32m8(x + i, vl), vl);
        __riscv_vse32_v_f32m8(y + i, vy, vl);
        i += (int64_t)vl;
    }
#else
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
#endif
}

/* y = a * y */
static inline void hs_scal(float *y, float a, int64_t n) {
#ifdef __riscv_v_intrinsic
    for (int64_t i = 0; i < n;) {
        size_t vl = __riscv_vsetvl_e32m8((size_t)(n - i));
        __riscv_vse32_v_f32m8(y + i, __riscv_vfmul_vf_f32m8(__riscv_vle32_v_f32m8(y + i, vl), a, vl), vl);
        i += (int64_t)vl;
    }
#else
    for (int64_t i = 0; i < n; i++) y[i] *= a;
#endif
}

/* y = x * w elementwise */
static inline void hs_mul(float *y, const float *x, const float *w, int64_t n) {
#ifdef __riscv_v_intrinsic
    for (int64_t i = 0; i < n;) {
        size_t vl = __riscv_vsetvl_e32m8((size_t)(n - i));
        __riscv_vse32_v_f32m8(y + i, __riscv_vfmul_vv_f32m8(__riscv_vle32_v_f32m8(x + i, vl),
                                                            __riscv_vle32_v_f32m8(w + i, vl), vl), vl);
        i += (int64_t)vl;
    }
#else
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * w[i];
#endif
}

static inline float hs_silu(float g) { return g / (1.0f + expf(-g)); }

#endif
