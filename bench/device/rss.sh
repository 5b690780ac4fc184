#!/usr/bin/env bash
# Issue 16, host memory (RSS), CPU only on the AMX host (quiet cores: this VM's wall times are
# noise). What capping torch's oneDNN GEMM primitive caches at 512 (halserve/__init__.py)
# costs and saves, and a short soak's memory judged idle to idle:
#  - bench/primitive_cache.py: the same workload (64 prefill lengths, decode through every
#    batch size 64..1, twice) in fresh processes at capacity 1024 and at halserve's default,
#    alternated: wall and CPU seconds per phase (ratio to 1024), oneDNN JIT builds, RSS growth
#  - tests/reliability/test_memory.py: the caps bound 1,200 GEMM shapes; the KV is resident
#  - halserve bench soak on the demo model: 64 streaming clients, 1.5 min (0.5 min warm-up)
# Usage: bash bench/device/rss.sh   (at most 6 minutes; logs and json in $OUT)
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error CUDA_VISIBLE_DEVICES=
unset ONEDNN_PRIMITIVE_CACHE_CAPACITY LRU_CACHE_CAPACITY
STEP_TAIL=12
. "$(dirname "$0")/step.sh"

step rss_primitive_cache 170 python3 bench/primitive_cache.py --caps 1024,default --rounds 2 \
  --json "$OUT/rss_primitive_cache.json"
step rss_test_memory 90 python3 -m pytest -q -p no:cacheprovider -s tests/reliability/test_memory.py \
  -k "primitive or resident"
step rss_soak 150 python3 -m halserve.cli bench soak --model halserve/demo_model --clients 64 --minutes 1.5 \
  --warmup-minutes 0.5 --max-tokens 32 --disconnect-every 0.5 --bad-every 0.25 --json "$OUT/rss_soak.json"
echo "rss.sh done in $SECONDS s"
