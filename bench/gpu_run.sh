#!/usr/bin/env bash
# The one script for device runs of the cuda backend: conformance, GPU tests, benchmarks.
#
#   bench/gpu_run.sh check          # env facts, full conformance (cuda), kernel + GPU pytest
#   bench/gpu_run.sh bench          # all benchmarks: lat1b lat8b latmoe thr1b thr8b
#   bench/gpu_run.sh all            # both
#   bench/gpu_run.sh check lat1b    # stages can be listed; qcheck = pytest + linear conformance
#   bench/gpu_run.sh offtest offload  # KV offload: its tests on the GPU, then its benchmark
#   bench/gpu_run.sh loadjob          # a filesystem-tier load job alone, by reader threads
#
# Logs go to $OUT (default ./gpu_out): check.log, conformance.txt, pytest.txt, bench.log and
# results.json (every benchmark's JSON merged). Run from the repository root.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT" "$OUT/.json"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PY="${PYTHON:-python3}"
# not `python -m halserve.cli`: sub-subcommands read halserve.cli.ARGV, which __main__ leaves empty
hs() { "$PY" -c 'import sys; from halserve.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
t0=$SECONDS
stamp() { echo "=== [$((SECONDS - t0))s] $*"; }

check() {
  {
    stamp env
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" -c 'import torch, triton, transformers; p = torch.cuda.get_device_properties(0); print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "|", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")'
    hs probe || true
  } 2>&1 | tee "$OUT/check.log"
  stamp "conformance (cuda, full)" | tee -a "$OUT/check.log"
  hs conformance --backend cuda --perf 2>&1 | tee "$OUT/conformance.txt" | tail -60
  echo "conformance exit: ${PIPESTATUS[0]}" | tee -a "$OUT/check.log"
  stamp "pytest: triton kernels on GPU + tests/gpu" | tee -a "$OUT/check.log"
  "$PY" -m pytest -q -rs --timeout=600 tests/hal/test_triton_kernels.py tests/gpu -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest.txt" | tail -40
  echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/check.log"
}

L=(--input-len 1024 --output-len 128)
NP="${NUM_PROMPTS:-1000}"
lat1b() { hs bench latency --preset llama-1b "${L[@]}" --variants "${LAT1B_VARIANTS:-bf16,fp8,bf16-bi,bf16-eager}" --hf-peer --json "$OUT/.json/lat_1b.json"; }
lat8b() { hs bench latency --preset llama-8b "${L[@]}" --variants bf16,fp8,bf16-bi,fp8-bi --hf-peer --json "$OUT/.json/lat_8b.json"; }
latmoe() { hs bench latency --preset qwen3-moe "${L[@]}" --variants bf16,fp8 --hf-peer --json "$OUT/.json/lat_moe.json"; }
thr1b() { hs bench throughput --preset llama-1b "${L[@]}" --num-prompts "$NP" --variants bf16,fp8,bf16-bi --hf-peer --hf-batch 64 --same-batch --json "$OUT/.json/thr_1b.json"; }
thr8b() { hs bench throughput --preset llama-8b "${L[@]}" --num-prompts "$NP" --variants bf16,fp8 --hf-peer --hf-batch 64 --json "$OUT/.json/thr_8b.json"; }
# KV offload: TTFT of an 8k prompt, recompute vs host / filesystem tier hits (and the files read on the CPU)
offload() {
  "$PY" -c 'import zlib, sys; print("python", sys.version.split()[0], "zlib", zlib.ZLIB_RUNTIME_VERSION)'
  df -h "${TMPDIR:-/tmp}" | tail -1
  hs bench offload --backend cuda --dtype bfloat16 --layers 16 --hidden 2048 --heads 16 --kv-heads 8 \
    --intermediate 5632 --max-num-batched-tokens 4096 --reuse-backend native --json "$OUT/.json/offload.json"
}
# the same in Llama-3-8B's shape (32 layers, hidden 4096, 32/8 heads): KV 1 GiB for the 8k prompt
offload8b() {
  hs bench offload --backend cuda --dtype bfloat16 --layers 32 --hidden 4096 --heads 32 --kv-heads 8 \
    --intermediate 14336 --max-num-batched-tokens 4096 --json "$OUT/.json/offload_8b.json"
}
# a load job alone (no engine): reading an 8k prompt's block files and copying them in, by reader threads
loadjob() { "$PY" bench/offload_load_job.py cuda; }
# a filesystem hit's engine timeline beside its load job (8B KV, thin MLP)
offprof() { "$PY" bench/offload_timeline.py cuda 2>&1 | grep -v "capturing"; }
# the offload tests, on the GPU too
offtest() { "$PY" -m pytest -q -rs --timeout=600 tests/engine/test_offload.py tests/gpu/test_engine_gpu.py -p no:cacheprovider 2>&1 | tail -15; }
BENCHES=(lat1b lat8b latmoe thr1b thr8b)

run_bench() { { stamp "$1"; "$1"; } 2>&1 | tee -a "$OUT/bench.log"; merge_json; }

qcheck() {  # after a kernel change: kernel tests, GPU tests, linear conformance
  { stamp "pytest (quick check)"
    "$PY" -m pytest -q -rs --timeout=600 tests/hal/test_triton_kernels.py tests/gpu -p no:cacheprovider 2>&1 | tail -25
    stamp "conformance linear"; hs conformance --backend cuda --op linear 2>&1 | tail -3; } 2>&1 | tee -a "$OUT/check.log"
}

merge_json() {  # results.json accumulates every benchmark run so far
  "$PY" -c '
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
old = out / "results.json"
merged = json.loads(old.read_text()) if old.exists() else {}
merged.update({p.stem: json.loads(p.read_text()) for p in sorted((out / ".json").glob("*.json"))})
old.write_text(json.dumps(merged, indent=1))
' "$OUT"
}

[ $# -eq 0 ] && set -- all
for stage in "$@"; do
  case "$stage" in
    check) check ;;
    qcheck) qcheck ;;
    lat1b|lat8b|latmoe|thr1b|thr8b|offload|offload8b|offtest|loadjob|offprof) run_bench "$stage" ;;
    bench) for b in "${BENCHES[@]}"; do run_bench "$b"; done ;;
    all) check; for b in "${BENCHES[@]}"; do run_bench "$b"; done ;;
    *) echo "usage: bench/gpu_run.sh [check|qcheck|bench|all|lat1b|lat8b|latmoe|thr1b|thr8b|offload|offload8b|offtest|loadjob|offprof]..."; exit 2 ;;
  esac
done
merge_json
rm -rf "$OUT/.json"
stamp finished
