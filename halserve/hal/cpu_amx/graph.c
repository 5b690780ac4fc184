/* Replay of a captured decode step's C kernel calls (graph.py records them): one call from
 * Python runs a whole run of kernels, so a step pays the interpreter once per run instead of
 * once per op (~10 ops a layer).
 *
 * An entry is GRAPH_SLOTS int64s: the kernel's address, whether its int result is an error
 * code, its integer and pointer arguments in order (up to GRAPH_INTS), and its float
 * arguments' bits (up to GRAPH_FLOATS, one a slot). The call goes through one function type
 * with GRAPH_FLOATS floats and GRAPH_INTS int64s: under the x86-64 System V ABI a kernel's
 * floats arrive in xmm0.. in their own order and its integers in rdi, rsi, rdx, rcx, r8, r9
 * and then 8-byte stack slots, whatever the two interleave as, so every kernel of int,
 * int64_t, pointer and float parameters reads exactly its own arguments (an int from the low
 * half of its slot; the caller pops the extra ones). graph.py checks each kernel's
 * parameter types (from the cffi declarations) before it lets an entry in here, so no
 * per-kernel code and no copy of any signature lives in this file. */
#include <stdint.h>
#include <string.h>

#define GRAPH_INTS 20
#define GRAPH_FLOATS 4
#define GRAPH_SLOTS (2 + GRAPH_INTS + GRAPH_FLOATS)

#if defined(__x86_64__) && !defined(_WIN32)
typedef int64_t (*graph_fn)(float, float, float, float, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t);

static inline float slot_f32(int64_t s) {
    uint32_t bits = (uint32_t)s;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

int hs_graph_slots(void) { return GRAPH_SLOTS; }

/* The torch ops a decode step does between kernels, as entries too (graph.py turns them into
 * these where the layout allows), so a step with them stays one C call: */

/* a strided copy of up to 4 dims (sizes n*, strides in elements s* for src, d* for dst):
 * kind 1/2/4/8 copies elements of that many bytes, kind 16 widens bfloat16 to float32 (exact) */
int hs_graph_copy(const char *src, char *dst, int kind, int64_t n0, int64_t n1, int64_t n2, int64_t n3, int64_t s0,
                  int64_t s1, int64_t s2, int64_t s3, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    int ss = kind == 16 ? 2 : kind, ds = kind == 16 ? 4 : kind;
    for (int64_t i0 = 0; i0 < n0; i0++)
        for (int64_t i1 = 0; i1 < n1; i1++)
            for (int64_t i2 = 0; i2 < n2; i2++) {
                const char *a = src + (i0 * s0 + i1 * s1 + i2 * s2) * ss;
                char *b = dst + (i0 * d0 + i1 * d1 + i2 * d2) * ds;
                if (kind == 16) {
                    for (int64_t i3 = 0; i3 < n3; i3++) {
                        uint16_t h;
                        memcpy(&h, a + i3 * s3 * 2, 2);
                        uint32_t w = (uint32_t)h << 16;
                        memcpy(b + i3 * d3 * 4, &w, 4);
                    }
                } else if (s3 == 1 && d3 == 1) {
                    memcpy(b, a, (size_t)(n3 * kind));
                } else {
                    for (int64_t i3 = 0; i3 < n3; i3++) memcpy(b + i3 * d3 * kind, a + i3 * s3 * kind, (size_t)kind);
                }
            }
    return 0;
}

/* embedding rows: dst[i] = weight[ids[i]] (row_bytes each); 1 where an id is out of range */
int hs_graph_embed(const char *weight, const int64_t *ids, char *dst, int64_t n, int64_t row_bytes, int64_t rows) {
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= rows) return 1;
        memcpy(dst + i * row_bytes, weight + ids[i] * row_bytes, (size_t)row_bytes);
    }
    return 0;
}

/* Runs entries [0, n); returns 0, 1 + the index of the first entry whose kernel returned a
 * nonzero error code (nothing after it runs), or -1 where this ABI has no replay. */
int hs_graph_run(const int64_t *prog, int n) {
#if defined(__x86_64__) && !defined(_WIN32)
    for (int e = 0; e < n; e++) {
        const int64_t *s = prog + (int64_t)e * GRAPH_SLOTS;
        const int64_t *a = s + 2, *f = s + 2 + GRAPH_INTS;
        graph_fn fn = (graph_fn)(uintptr_t)s[0];
        int rc = (int)fn(slot_f32(f[0]), slot_f32(f[1]), slot_f32(f[2]), slot_f32(f[3]), a[0], a[1], a[2], a[3],
                         a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15], a[16], a[17],
                         a[18], a[19]);
        if (s[1] && rc != 0) return e + 1;
    }
    return 0;
#else
    (void)prog;
    (void)n;
    return -1;
#endif
}
