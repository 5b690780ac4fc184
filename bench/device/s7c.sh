#!/usr/bin/env bash
# Session 7's third sitting (<= 590 s), after s7a/s7b: the GPU phase, then the CPU phase alone on the host.
#  GPU (issue 20): (1) the fp8 skinny forms' sweep on the 8B shapes (bench/skinny_gemm.py --parts fp8_new);
#   (2) the 8B end to end on the committed configs: bf16, fp8, both batch-invariant, batch 1 and 64, the
#   batch-64 figure twice warmed (s7a's batch-invariant b64 run had a compile or first-path cost inside it:
#   53 ms of prefill kernels and 7.5 ms a step, yet 2.6 s) and also cold (unseen prompts, prefill timed);
#   (3) fp8 again on the sweep's table, if it wrote one.
#  CPU, 16 threads, CUDA_VISIBLE_DEVICES= (issue 22): (4) why 1.1B int4 decode ran at 17% of the read
#   roofline in s7b (int8 74%): the same run at 16 / 12 / 8 threads, with graphs off, with OMP spin;
#   (5) the 8B shape's int8/int4 rows beside llama.cpp Q8_0/Q4_0 at 16 threads (cut in s7b);
#   (6) the 1.1B int4/int8 GEMVs alone at 16 threads (amxq.sh's table, 1.1B shapes).
. "$(dirname "$0")/step.sh"
stage_env
T0=$SECONDS
STEP_TAIL=20 step fp8_sweep 70 python3 bench/skinny_gemm.py --sweep --warm 4 --budget 34 \
    --parts fp8_new --json "$OUT/fp8_sweep.json" --emit-table "$OUT/fp8_table.json"
STEP_TAIL=12 step e2e_8b 165 python3 bench/e2e_decode.py --preset llama-8b --variants bf16,bf16-bi,fp8,fp8-bi \
    --batches 1,64 --json "$OUT/e2e_8b.json"
[ -s "$OUT/fp8_table.json" ] && HALSERVE_SKINNY_CONFIGS="$OUT/fp8_table.json" STEP_TAIL=8 step e2e_8b_sweep 60 \
    python3 bench/e2e_decode.py --preset llama-8b --variants fp8 --batches 1 --json "$OUT/e2e_8b_sweep.json"
echo "--- GPU phase done at +$((SECONDS - T0)) s"
rm -rf /dev/shm/halserve-bench
cpu_stage_env
W=/dev/shm/s7c-work; mkdir -p $W
PEER=/tmp/s7c-llamacpp; mkdir -p $PEER
tar -xJf .carry/peers/llama.cpp-x86-64-amx.tar.xz -C $PEER && tar -xJf .carry/peers/converter.tar.xz -C $PEER || PEER=""
B="python3 -m halserve.cli bench cpu --work-dir $W --backends cpu_amx --no-hf --batch 0 --ttft-len 0"
STEP_TAIL=4 step int4_t16 40 $B --threads 16 --quant int4,int8 --output-len 32
STEP_TAIL=4 step int4_t12 25 $B --threads 12 --quant int4 --output-len 32
STEP_TAIL=4 step int4_t8 25 $B --threads 8 --quant int4 --output-len 32
HALSERVE_CPU_GRAPHS=0 STEP_TAIL=4 step int4_t16_eager 25 $B --threads 16 --quant int4 --output-len 32
OMP_WAIT_POLICY=ACTIVE STEP_TAIL=4 step int4_t16_active 25 $B --threads 16 --quant int4,int8 --output-len 32
left=$((585 - (SECONDS - T0)))
lim8=$((left - 45)); [ $lim8 -gt 120 ] && lim8=120
STEP_TAIL=14 step cpu_8b $lim8 $B --threads 16 --shape 8b --layers 4 --vocab 32000 --quant int8,int4 --input-len 32 \
    --output-len 16 ${PEER:+--llama-cpp $PEER} --gguf q8_0,q4_0 --json "$OUT/cpu_8b.json"
left=$((585 - (SECONDS - T0)))
[ $left -gt 25 ] && THREADS=16 SHAPES=1.1b GEMV_S=$((left - 5)) STEP_S=1 TEST_S=1 OUT="$OUT/amxq" timeout $((left - 2)) \
    bash bench/device/amxq.sh > "$OUT/amxq.log" 2>&1
tail -n 30 "$OUT/amxq/amxq.txt" 2>/dev/null
echo "--- done at +$((SECONDS - T0)) s"
