#!/usr/bin/env bash
# Session 7's third sitting, CPU phase (after s7g.sh; see its header): 16 threads alone on the AMX host.
. "$(dirname "$0")/step.sh"
cpu_stage_env
T0=$SECONDS
W=/dev/shm/s7c-work; mkdir -p $W
PEER=/tmp/s7c-llamacpp; mkdir -p $PEER
tar -xJf .carry/peers/llama.cpp-x86-64-amx.tar.xz -C $PEER && tar -xJf .carry/peers/converter.tar.xz -C $PEER || PEER=""
B="python3 -m halserve.cli bench cpu --work-dir $W --backends cpu_amx --no-hf --batch 0 --ttft-len 0"
STEP_TAIL=9 step q_threads 60 python3 bench/device/q_threads.py --threads 1,2,4,8,12,16 --set-mb 768 --reps 3
STEP_TAIL=4 step int4_t16 40 $B --threads 16 --quant int4,int8 --output-len 32
STEP_TAIL=4 step int4_t12 25 $B --threads 12 --quant int4 --output-len 32
STEP_TAIL=4 step int4_t8 20 $B --threads 8 --quant int4 --output-len 32
HALSERVE_CPU_GRAPHS=0 STEP_TAIL=4 step int4_t16_eager 25 $B --threads 16 --quant int4 --output-len 32
OMP_WAIT_POLICY=ACTIVE STEP_TAIL=4 step int4_t16_active 25 $B --threads 16 --quant int4,int8 --output-len 32
left=$((${S7P_BUDGET:-335} - (SECONDS - T0)))
lim8=$((left - 45)); [ $lim8 -gt 120 ] && lim8=120
STEP_TAIL=14 step cpu_8b $lim8 $B --threads 16 --shape 8b --layers 4 --vocab 32000 --quant int8,int4 --input-len 32 \
    --output-len 16 ${PEER:+--llama-cpp $PEER} --gguf q8_0,q4_0 --json "$OUT/cpu_8b.json"
left=$((${S7P_BUDGET:-335} - (SECONDS - T0)))
[ $left -gt 25 ] && THREADS=16 SHAPES=1.1b GEMV_S=$((left - 5)) STEP_S=1 TEST_S=1 OUT="$OUT/amxq" timeout $((left - 2)) \
    bash bench/device/amxq.sh > "$OUT/amxq.log" 2>&1
tail -n 30 "$OUT/amxq/amxq.txt" 2>/dev/null
echo "--- done at +$((SECONDS - T0)) s"
