#!/usr/bin/env bash
# Issue 20's GPU phase (session 7's plan; run after the CPU phase: `S7G_KEEP=1 lead.sh s9p:373 s7g:212`):
#  (1, with S7_SWEEP=1) the fp8 skinny forms' sweep on the 8B shapes (bench/skinny_gemm.py --parts fp8_new);
#  (2) the 8B end to end on the committed configs: bf16, fp8, both batch-invariant, batch 1 and 64 (the kernel
#   table of a step at each), the batch-64 figure twice warmed (s7a's batch-invariant b64 run had a compile or
#   first-path cost inside it: 53 ms of prefill kernels and 7.5 ms a step, yet 2.6 s) and also cold (unseen
#   prompts, prefill timed); (3) fp8 again on the sweep's table, if it wrote one. S7G_KEEP=1 leaves the
#   checkpoint for s9g.sh; S7G_E2E_S sets (2)'s limit (220 s).
. "$(dirname "$0")/step.sh"
stage_env
T0=$SECONDS
[ "${S7_SWEEP:-0}" = 1 ] && STEP_TAIL=20 step fp8_sweep 70 python3 bench/skinny_gemm.py --sweep --warm 4 --budget 34 \
    --parts fp8_new --json "$OUT/fp8_sweep.json" --emit-table "$OUT/fp8_table.json"
STEP_TAIL=12 step e2e_8b ${S7G_E2E_S:-220} python3 bench/e2e_decode.py --preset llama-8b --variants bf16,bf16-bi,fp8,fp8-bi \
    --batches 64,1 --profile 2 --json "$OUT/e2e_8b.json"
[ -s "$OUT/fp8_table.json" ] && HALSERVE_SKINNY_CONFIGS="$OUT/fp8_table.json" STEP_TAIL=8 step e2e_8b_sweep 60 \
    python3 bench/e2e_decode.py --preset llama-8b --variants fp8 --batches 1 --json "$OUT/e2e_8b_sweep.json"
echo "--- GPU phase done at +$((SECONDS - T0)) s"
[ "${S7G_KEEP:-0}" = 1 ] || rm -rf /dev/shm/halserve-bench
