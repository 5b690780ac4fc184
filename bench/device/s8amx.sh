#!/usr/bin/env bash
# Issue 22, next sitting (<= 270 s, CPU only, 16 threads alone): does batch-1 bf16 decode gain from the
# AMX tile kernel at M = 1 (bench/device/amx_ab.py), and what do 16-row blocks (the default at 16
# threads) give 16 and 64 sequences against 32-row blocks with and without the next block
# prefetched (the default at <= 4 threads since session 8)? Runs alternate, same weights.
. "$(dirname "$0")/step.sh"
cpu_stage_env
W=/dev/shm/s8amx-work; mkdir -p $W
A="python3 bench/device/amx_ab.py bench cpu --work-dir $W --backends cpu_amx --threads $T --gguf none"
for i in 1 2; do
  AMX_MIN_M=2 STEP_TAIL=3 step b1_gemv_$i 30 $A --quant none --no-hf --batch 0 --ttft-len 0 --output-len 32 --repeats 3
  AMX_MIN_M=1 STEP_TAIL=3 step b1_amx_$i 30 $A --quant none --no-hf --batch 0 --ttft-len 0 --output-len 32 --repeats 3
done
for v in 32:16 16:0 32:0; do  # rows:prefetch flags (16: no next-block prefetch; 0: the default, on at 32 rows)
  AMX_ROWS=${v%%:*} AMX_PF_FLAGS=${v#*:} STEP_TAIL=3 step batched_rows${v/:/_pf} 45 $A --quant none --no-hf \
      --output-len 4 --ttft-len 0 --batch 16,64 --batch-input-len 32 --batch-output-len 16
done
rm -rf $W
