#!/usr/bin/env bash
# Issue 20, fp8 at batch 1 (1.36x bf16 in session 7, goal 1.7x): session 4's gemvr / PDL / in-kernel
# quantization forms have never run on a GPU. (1) sweep them against the committed table on the 8B shapes
# (bench/skinny_gemm.py --parts fp8_new; winners written as a HALSERVE_SKINNY_CONFIGS file), (2) the 8B fp8
# end to end at batch 1 and 16 on those winners (the checkpoint s7g.sh keeps), (3) the GPU tests of the
# skinny forms on the winners, eager and replayed from graphs. <= 170 s: `lead.sh s9g:150 s10f:170 ...`.
. "$(dirname "$0")/step.sh"
stage_env
STEP_TAIL=24 step fp8_sweep 70 python3 bench/skinny_gemm.py --sweep --warm 4 --budget 34 \
    --parts fp8_new --json "$OUT/fp8_sweep.json" --emit-table "$OUT/fp8_table.json"
if [ -s "$OUT/fp8_table.json" ]; then
  export HALSERVE_SKINNY_CONFIGS="$OUT/fp8_table.json"
  STEP_TAIL=10 step e2e_8b_fp8_table 60 python3 bench/e2e_decode.py --preset llama-8b --variants fp8 --batches 1,16 \
      --profile 1 --json "$OUT/e2e_8b_fp8_table.json"
fi
STEP_TAIL=8 step skinny_tests 35 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_skinny_gpu.py
rm -rf /dev/shm/halserve-bench
