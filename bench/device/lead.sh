#!/usr/bin/env bash
# Device-run driver (the H200 machine and its AMX host): installs the carried wheels, then runs the
# named stage scripts bench/device/<stage>.sh one after another, each with its own time limit, each
# logging to $OUT/<stage>.log. Usage: bash bench/device/lead.sh stage[:seconds] ...
set -uo pipefail
FINAL="${OUT:-$PWD/device_out}"; mkdir -p "$FINAL"
OUT=/tmp/devout; rm -rf "$OUT"; mkdir -p "$OUT"  # stages write here; one archive goes back (the tool returns at most 8 files)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1; lscpu | grep -E 'Model name|^CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|NUMA node|L2|L3'; 
  grep -o 'amx[a-z0-9_]*\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; gcc --version | head -1;
  python3 -c 'import torch, triton, transformers, cffi; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "cffi", cffi.__version__)'; } 2>&1 | tee /tmp/devout/env.txt
t0=$SECONDS
for spec in "$@"; do
  stage=${spec%%:*}; lim=${spec#*:}; [ "$lim" = "$spec" ] && lim=300
  export OUT="/tmp/devout/$stage"; mkdir -p "$OUT"
  echo "=== [$((SECONDS - t0))s] $stage (limit ${lim}s)"
  timeout -k 10 "$lim" bash "bench/device/$stage.sh" > "/tmp/devout/$stage.log" 2>&1
  rc=$?; echo "=== [$((SECONDS - t0))s] $stage rc=$rc"; tail -n 25 "/tmp/devout/$stage.log"
  tar -czf "$FINAL/results.tar.gz" -C /tmp/devout .
done
cp /tmp/devout/env.txt "$FINAL/" 2>/dev/null
