#!/usr/bin/env bash
# Dynamic instruction counts per riscv_rvv kernel, RVV build against scalar build, under
# qemu-user (-singlestep: one instruction per translated block; -d exec,nochain logs each
# executed block, so the log's line count is the instruction count). Baseline ("none",
# the set-up only) subtracted. No wall-clock: qemu's speed says nothing about silicon.
# Usage: tools/riscv_insn_count.sh [VLEN]   (needs the sysroot from tools/riscv_qemu.sh)
set -u
cd "$(dirname "$0")/.."
RV_DIR=${RV_DIR:-$HOME/.cache/halserve/riscv64}
ROOT=$RV_DIR/root
VLEN=${1:-256}
K=halserve/hal/riscv_rvv
CC=(clang-19 --target=riscv64-linux-gnu --sysroot="$ROOT" -O3 -std=c11 -D_GNU_SOURCE -I$K)
for arch in rv64gcv rv64gc; do
  # the driver's own set-up loops stay scalar: qemu 7.2 asserts (decode_save_opc) on the
  # auto-vectorised form of its random fill; the kernels build exactly as in the library
  "${CC[@]}" -march=$arch -fno-vectorize -fno-slp-vectorize -c tools/riscv_insn_count.c -o "$RV_DIR/drv_$arch.o" &&
  "${CC[@]}" -fuse-ld=lld -static -march=$arch "$RV_DIR/drv_$arch.o" $K/linear.c $K/elementwise.c $K/paged.c \
    $K/moe.c $K/sample.c $K/common.c -o "$RV_DIR/insn_$arch" -lm || { echo "build $arch failed"; exit 1; }
done
count() { qemu-riscv64-static -cpu rv64,v=true,vext_spec=v1.0,vlen=$VLEN -singlestep -d exec,nochain \
            -D /dev/stderr "$RV_DIR/insn_$1" "$2" 2>&1 >/dev/null | grep -c '^Trace'; }
b_v=$(count rv64gcv none); b_s=$(count rv64gc none)
printf "%-18s %14s %14s %8s   (VLEN %s; dynamic instructions, set-up subtracted)\n" op scalar rvv ratio "$VLEN"
for op in linear_f32 linear_bf16 linear_int8 rms_norm rms_norm_bf16 silu_and_mul rotary write_kv \
          attention_decode moe sample; do
  s=$(( $(count rv64gc $op) - b_s )); v=$(( $(count rv64gcv $op) - b_v ))
  printf "%-18s %14d %14d %7.1fx\n" $op $s $v "$(echo "$s / $v" | bc -l)"
done
