/* Thread pool and AMX permission. Linux hands out AMX tile state only to processes that
 * ask (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without it the first tile
 * instruction faults, so the probe asks here and falls back to AVX-512 when refused. */
#include <omp.h>
#include "common.h"
#include <unistd.h>
#include <errno.h>
#include <sys/syscall.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int hs_amx_request(void) {
#ifdef SYS_arch_prctl
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return -errno;
    unsigned long bits = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bits) != 0) return -errno;
    return (bits >> XFEATURE_XTILEDATA) & 1 ? 0 : -EPERM;
#else
    return -ENOSYS;
#endif
}

void hs_set_threads(int n) { omp_set_num_threads(n); }

int hs_small_par = 1;
void hs_set_small_parallel(int on) { hs_small_par = on != 0; }

int hs_get_threads(void) { return omp_get_max_threads(); }

/* the tier this library was compiled for: 3 amx, 2 avx512, 1 avx2, 0 generic */
int hs_tier(void) {
#if defined(__AMX_TILE__)
    return 3;
#elif defined(__AVX512F__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
