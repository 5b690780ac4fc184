#!/usr/bin/env bash
# Issue 22, session 9's CPU phase (<= 380 s, 16 threads alone on the AMX host; then the GPU phase:
# `S7G_KEEP=1 lead.sh s9p:380 s7g:215`):
#  (1) the 1.1B GEMVs alone per thread count, bf16/int8/int4 beside a read probe at each (q_threads.py):
#      does int4 stop scaling where the others go on (s7's 1.1B int4 decode: 19 GB/s on 16 threads)?
#  (2) the 1.1B batch-1 table at the bit widths, with and without the lm_head quantized (llama.cpp's
#      Q8_0 file holds output.weight in Q8_0, its Q4_0 file in Q6_K: '+lm_head' reads what they read),
#      beside llama.cpp Q8_0 / Q4_0 in the same run;
#  (3) prefill-shaped bf16 GEMMs per thread count, oneDNN against the AMX kernel (gemm_threads.py: on this
#      2-vCPU box 2 threads prefill 1024 tokens in 1.99 s, the host's 16 in 1.03 s, while llama.cpp's
#      prefill gains 5.2x from 2 to 16 threads); int4 again at 16 threads with graphs off, with OMP spin;
#  (4) the 8B shape's int8/int4 rows (+lm_head) beside llama.cpp Q8_0/Q4_0 (cut in session 7).
. "$(dirname "$0")/step.sh"
cpu_stage_env
T0=$SECONDS
W=/dev/shm/s9-work; mkdir -p $W
. "$(dirname "$0")/s10q.sh"  # (1) and (3)'s GEMMs: q_threads, gemm_threads
. "$(dirname "$0")/s10b.sh"  # (2): the 1.1B batch-1 table in $W; sets PEER
B="python3 -m halserve.cli bench cpu --work-dir $W --backends cpu_amx --no-hf --batch 0 --ttft-len 0"
if [ "${S9P_AB:-1}" = 1 ]; then  # S9P_AB=0: leave out the int4 graphs-off / OMP-spin runs (a short sitting)
  HALSERVE_CPU_GRAPHS=0 STEP_TAIL=4 step int4_t16_eager 22 $B --threads $T --quant int4 --output-len 32 --gguf none
  OMP_WAIT_POLICY=ACTIVE STEP_TAIL=4 step int4_t16_active 22 $B --threads $T --quant int4 --output-len 32 --gguf none
fi
left=$((${S9P_BUDGET:-375} - (SECONDS - T0)))
STEP_TAIL=14 step cpu_8b $((left - 3)) $B --threads $T --shape 8b --layers 4 --vocab 32000 \
    --quant int8,int8+lm_head,int4,int4+lm_head --input-len 32 --output-len 16 ${PEER:+--llama-cpp $PEER} \
    --gguf q8_0,q4_0 --json "$OUT/cpu_8b.json"
echo "--- done at +$((SECONDS - T0)) s"
rm -rf $W
