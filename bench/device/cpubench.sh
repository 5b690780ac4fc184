#!/usr/bin/env bash
# Issue 22's benchmark table on the AMX host (the H200 machine's 16-core Xeon), CPU only, <= 240 s:
# `halserve bench cpu` beside llama.cpp (its static AMX build, same weights converted to GGUF) and
# HF transformers, 16 threads, one sitting per shape:
#   1.1B (TinyLlama shape): cpu_amx bf16/int8/int4 batch-1 decode + TTFT of 1024 tokens (beside HF's and
#        llama.cpp's pp1024 at each bit width), 16 and 64 sequences' decode (bf16) | HF bf16 |
#        llama.cpp BF16/Q8_0/Q4_0 (llama-bench, batched-bench)
#   1.1B prefill profile (`python -m halserve.bench.cpu_prefill`): TTFT 1024 of this tree's prefill paths
#        against the earlier ones in the same run (bf16/int8/int4), time per HAL op, HF's forward, GEMM floor
#   8B layer shape (4 of 32 layers, 32k vocab): cpu_amx bf16/int8/int4 batch 1 | llama.cpp BF16/Q8_0/Q4_0
# The Qwen3-MoE shape is left out (it did not fit the budget beside the others; run it alone with
#   CPUBENCH_MOE=1: bf16 and int8 experts beside llama.cpp BF16 and Q8_0, about 100 s more: the GGUF
#   conversions and the int8 load take ~50 s of it; bench/device/amxmoe.sh is the shorter MoE sitting).
set -u
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-/tmp/site:.} PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HALSERVE_CACHE_DIR=${HALSERVE_CACHE_DIR:-/tmp/halserve-cache}
unset TRITON_INTERPRET
T=${THREADS:-16}
STEP_TAIL=40
. "$(dirname "$0")/step.sh"
MD="$OUT/cpubench.md"
{ echo "### AMX host, $(date -u '+%Y-%m-%d %H:%M UTC'), $T threads"; echo
  echo "- CPU: $(lscpu | grep -E 'Model name|^CPU\(s\)|L3' | sed 's/  */ /g' | paste -sd ';')"
  echo "- flags: $(grep -o -w 'amx_[a-z0-9]*\|avx512_bf16\|avx512_fp16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "- load average $(cut -d' ' -f1-3 /proc/loadavg); $(free -g | awk '/Mem:/{print $2 " GB RAM, " $7 " GB available"}')"
  echo; } > "$MD"
cat "$MD"

PEER=$(peer_llamacpp /tmp/cpubench-llamacpp)
[ -z "$PEER" ] && echo "no llama.cpp peer (.carry/peers/ archives missing): llama.cpp rows skipped" | tee -a "$MD"
# checkpoints and GGUF files in RAM (about 20 GB at most): writing ~15 GB to disk would take much of the budget
W=/tmp/cpubench-work
[ "$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)" -gt 40 ] 2>/dev/null && W=/dev/shm/cpubench-work
mkdir -p $W
B="python3 -m halserve.cli bench cpu --threads $T --markdown $MD --work-dir $W ${PEER:+--llama-cpp $PEER}"
# CPUBENCH_EXTRA: flags appended to every step (the last wins), e.g. a scaled-down dry run here:
#   THREADS=2 CPUBENCH_EXTRA="--layers 1 --vocab 1024 --ttft-len 64" bash bench/device/cpubench.sh
X=${CPUBENCH_EXTRA:-}

step cpubench_1b 133 $B --shape 1.1b --backends cpu_amx --quant none,int8,int4 --input-len 128 --output-len 32 \
  --ttft-len 1024 --batch 16,64 --batch-input-len 32 --batch-output-len 16 --gguf bf16,q8_0,q4_0 \
  --batch-gguf bf16 --json "$OUT/cpubench_1b.json" $X
step cpubench_prefill 50 python3 -m halserve.bench.cpu_prefill --threads $T --work-dir $W --len 1024 \
  --quant none,int8,int4 --repeats 1 ${CPUBENCH_PREFILL_EXTRA:-}
{ echo; echo "1.1B prefill profile (\`python -m halserve.bench.cpu_prefill --threads $T --len 1024\`):"; echo '```'
  grep -v -i 'it/s\]\|warn' "$OUT/cpubench_prefill.txt"; echo '```'; echo; } >> "$MD"
step cpubench_8b 55 $B --shape 8b --layers 4 --vocab 32000 --backends cpu_amx --quant none,int8,int4 --no-hf \
  --input-len 32 --output-len 16 --batch 0 --gguf bf16,q8_0,q4_0 --json "$OUT/cpubench_8b.json" $X
[ "${CPUBENCH_MOE:-0}" = 1 ] && step cpubench_moe 110 $B --shape qwen3-moe --layers 4 --experts 64 --vocab 32000 --backends cpu_amx --quant none,int8 \
  --no-hf --input-len 32 --output-len 16 --batch 0 --gguf bf16,q8_0 --json "$OUT/cpubench_moe.json" $X
echo "== tables: $MD"; cat "$MD"
rm -rf /dev/shm/cpubench-work  # give the RAM back
