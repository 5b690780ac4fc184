/* Build facts and the thread count. */
#include "hs_rvv.h"

int hs_build_info(void) {
    int info = 0;
#ifdef __riscv_v_intrinsic
    info |= 1 | (int)(__riscv_vsetvlmax_e8m1() * 8) << 8;
#endif
#ifdef _OPENMP
    info |= 2;
#endif
    return info;
}

void hs_set_threads(int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}
