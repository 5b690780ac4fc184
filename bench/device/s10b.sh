#!/usr/bin/env bash
# Issue 22, the 1.1B batch-1 table (<= 125 s, 16 threads alone on the AMX host): int8 / int4 with and without
# the lm_head quantized, beside llama.cpp Q8_0 / Q4_0 in the same run. A short sitting's last stage
# (`lead.sh s10q:85 s7g:212 s10b:125`) and s9p.sh's second part (sourced: it passes its own work dir W and
# reuses the PEER set here).
. "$(dirname "$0")/step.sh"
cpu_stage_env
S10B_OWN_W=0; [ -z "${W:-}" ] && { W=/dev/shm/s10b-work; S10B_OWN_W=1; }
mkdir -p "$W"
PEER=$(peer_llamacpp /tmp/s10b-llamacpp)
STEP_TAIL=14 step b1_1b 118 python3 -m halserve.cli bench cpu --work-dir $W --backends cpu_amx --no-hf --batch 0 \
    --ttft-len 0 --threads $T --quant int8,int8+lm_head,int4,int4+lm_head --output-len 32 --repeats 2 \
    ${PEER:+--llama-cpp $PEER} --gguf q8_0,q4_0 --json "$OUT/b1_1b.json"
if [ $S10B_OWN_W = 1 ]; then rm -rf "$W"; fi
