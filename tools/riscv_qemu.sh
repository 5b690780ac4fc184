#!/usr/bin/env bash
# The riscv_rvv proof under qemu: a riscv64 Debian trixie userland (no root binfmt needed),
# the RVV build cross-compiled with clang-19, then for each VLEN:
#   (1) halserve conformance --backend riscv_rvv --quick
#   (2) halserve generate on the demo model, greedy, compared with x86 native in this run.
# Usage: tools/riscv_qemu.sh [--ci | --generate-only] [--op NAME]... [--vlen N]...
#   (default VLENs 128 256 512) --ci: conformance only; --generate-only: no conformance;
#   --op: conformance of these ops only (default: every op, the quick set).
# Needs: clang-19 lld-19 qemu-user-static mmdebstrap (apt-get install), pip, network for the
# first run (Debian packages ~600 MB, the tokenizers riscv64 wheel). Cached in $RV_DIR.
# Env: RV_DIR (default ~/.cache/halserve/riscv64), MIRROR (default http://deb.debian.org/debian).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
RV_DIR=${RV_DIR:-$HOME/.cache/halserve/riscv64}
ROOT=$RV_DIR/root
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CI=0
GEN_ONLY=0
VLENS=()
OPS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ci) CI=1 ;;
    --generate-only) GEN_ONLY=1 ;;
    --op) shift; OPS+=(--op "$1") ;;
    --vlen) shift; VLENS+=("$1") ;;
    *) echo "riscv_qemu.sh: unknown argument $1 (use --ci, --vlen N)"; exit 2 ;;
  esac
  shift
done
[ ${#VLENS[@]} -eq 0 ] && VLENS=(128 256 512)
mkdir -p "$RV_DIR"
say() { echo "[riscv_qemu $(date -u +%H:%M:%S)] $*"; }
FAIL=0

for tool in clang-19 qemu-riscv64-static mmdebstrap; do
  command -v $tool >/dev/null || { echo "riscv_qemu.sh: $tool missing (apt-get install clang-19 lld-19 qemu-user-static mmdebstrap)"; exit 2; }
done

# ---- 1. the userland ----------------------------------------------------------------------
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  say "extracting Debian trixie riscv64 into $ROOT (~600 MB, first run only)"
  rm -rf "$ROOT"
  mmdebstrap --variant=extract --architectures=riscv64 \
    --include=python3,python3-torch,python3-numpy,python3-cffi,python3-safetensors,python3-tqdm,python3-jinja2,python3-yaml,python3-pydantic,python3-prometheus-client,libc6-dev,libgcc-14-dev,libomp-19-dev,libomp5-19 \
    trixie "$ROOT" "$MIRROR" || { say "mmdebstrap failed: no userland (exit 3: set-up, not a test failure)"; exit 3; }
fi
# the extract variant runs no maintainer scripts: make the merged-usr and alternatives links
for d in bin sbin lib; do [ -e "$ROOT/$d" ] || ln -s usr/$d "$ROOT/$d"; done
LIBDIR=$ROOT/usr/lib/riscv64-linux-gnu
for l in libblas.so.3 liblapack.so.3; do
  if [ ! -e "$LIBDIR/$l" ]; then
    cand=$(ls "$LIBDIR"/openblas-pthread/$l "$LIBDIR"/*/$l 2>/dev/null | head -1)
    [ -n "$cand" ] && ln -sf "${cand#$LIBDIR/}" "$LIBDIR/$l" && say "linked $l -> ${cand#$LIBDIR/}"
  fi
done
PYVER=$(ls "$ROOT/usr/lib" | grep -E '^python3\.[0-9]+$' | sort -V | tail -1)

# ---- 2. tokenizers (no Debian riscv64 package): the registry's manylinux riscv64 wheel --------
SITE=$RV_DIR/site
if [ ! -d "$SITE/tokenizers" ]; then
  say "fetching the tokenizers riscv64 wheel"
  mkdir -p "$RV_DIR/wheels" "$SITE"
  ok=0
  for plat in manylinux_2_31_riscv64 manylinux_2_28_riscv64 manylinux_2_39_riscv64 manylinux_2_35_riscv64; do
    if python3 -m pip download -q --only-binary=:all: --no-deps --platform $plat --implementation cp \
         --python-version "${PYVER#python}" -d "$RV_DIR/wheels" tokenizers 2>/dev/null; then ok=1; break; fi
  done
  [ $ok = 1 ] || { say "no tokenizers riscv64 wheel found (exit 3: set-up, not a test failure)"; exit 3; }
  for w in "$RV_DIR"/wheels/tokenizers-*riscv64*.whl; do python3 -m zipfile -e "$w" "$SITE"; done
  # huggingface_hub is imported by tokenizers only for Hub downloads; the demo model is local
fi

# ---- 3. the RVV build (and the scalar build, for instruction counts) ------------------------
SRC=$(ls halserve/hal/riscv_rvv/*.c)
CROSS=(clang-19 --target=riscv64-linux-gnu --sysroot="$ROOT" -fuse-ld=lld -O3 -shared -fPIC -std=c11 -D_GNU_SOURCE
       -Ihalserve/hal/riscv_rvv)
build() {  # out march
  if "${CROSS[@]}" -march=$2 -fopenmp -L"$ROOT/usr/lib/llvm-19/lib" $SRC -o "$1" -lm 2>"$1.log"; then
    echo "$2 + OpenMP (libomp)";
  elif "${CROSS[@]}" -march=$2 $SRC -o "$1" -lm 2>>"$1.log"; then echo "$2, one thread (no OpenMP in the sysroot)";
  else echo FAILED; cat "$1.log"; return 1; fi
}
say "cross-compiling: $(build "$RV_DIR/libhs_rvv.so" rv64gcv)"
say "cross-compiling scalar: $(build "$RV_DIR/libhs_scalar.so" rv64gc)"

QEMU_BASE=(qemu-riscv64-static -L "$ROOT")
run_py() {  # vlen lib args...
  local vlen=$1 lib=$2; shift 2
  env -i HOME="$HOME" PATH=/usr/bin:/bin LANG=C.UTF-8 PYTHONPATH="$REPO:$SITE" PYTHONUNBUFFERED=1 \
    HALSERVE_RISCV_RVV_LIB="$lib" HALSERVE_CACHE_DIR="$RV_DIR/cache" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
    "${QEMU_BASE[@]}" -cpu rv64,v=true,vext_spec=v1.0,vlen=$vlen "$ROOT/usr/bin/python3" "$@"
}

# ---- 4. x86 native reference for generate (this repo's venv, else python3) ---------------
X86_PYTHON=${X86_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PROMPTS=("The capital of France is Paris. The capital of Germany is")
if [ $CI = 0 ]; then
  for i in "${!PROMPTS[@]}"; do
    HALSERVE_BACKEND=native PYTHONPATH=$REPO $X86_PYTHON -m halserve generate --dtype float32 --max-tokens 24 \
      --temperature 0 --prompt "${PROMPTS[$i]}" > "$RV_DIR/x86_native_$i.txt" 2>"$RV_DIR/x86_native_$i.err"
    tail -1 "$RV_DIR/x86_native_$i.err" >> "$RV_DIR/x86_native_$i.txt"
  done
fi

# ---- 5. per VLEN: conformance, generate ----------------------------------------------------
for v in "${VLENS[@]}"; do
  t0=$(date +%s)
  if [ $GEN_ONLY = 1 ]; then :
  elif say "VLEN $v: conformance --quick ${OPS[*]}"; \
       run_py $v "$RV_DIR/libhs_rvv.so" -m halserve conformance --backend riscv_rvv --quick "${OPS[@]}" \
         > "$RV_DIR/conf_$v.txt" 2>&1; then
    say "VLEN $v conformance: $(tail -1 "$RV_DIR/conf_$v.txt") in $(( $(date +%s) - t0 )) s"
  else
    say "VLEN $v conformance FAILED: $(grep -A1 FAIL "$RV_DIR/conf_$v.txt" | head -6; tail -3 "$RV_DIR/conf_$v.txt")"; FAIL=1
  fi
  [ $CI = 1 ] && continue
  for i in "${!PROMPTS[@]}"; do
    run_py $v "$RV_DIR/libhs_rvv.so" -m halserve generate --backend riscv_rvv --dtype float32 --max-tokens 24 \
      --temperature 0 --prompt "${PROMPTS[$i]}" > "$RV_DIR/rvv_${v}_$i.txt" 2>"$RV_DIR/rvv_${v}_$i.err"
    tail -1 "$RV_DIR/rvv_${v}_$i.err" >> "$RV_DIR/rvv_${v}_$i.txt"
    say "VLEN $v: $(grep -o 'engine ready.*build=[^;]*' "$RV_DIR/rvv_${v}_$i.err" | sed 's/accelerated=.*build=/build=/')"
    if cmp -s "$RV_DIR/rvv_${v}_$i.txt" "$RV_DIR/x86_native_$i.txt"; then
      say "VLEN $v generate prompt $i: equal to x86 native ($(tail -1 "$RV_DIR/rvv_${v}_$i.txt"))"
    else
      say "VLEN $v generate prompt $i: DIFFERS from x86 native"; diff "$RV_DIR/rvv_${v}_$i.txt" "$RV_DIR/x86_native_$i.txt" | head; 
      tail -3 "$RV_DIR/rvv_${v}_$i.err"; FAIL=1
    fi
  done
done
say "done: $([ $FAIL = 0 ] && echo all passed || echo FAILURES above)"
exit $FAIL
