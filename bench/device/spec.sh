#!/usr/bin/env bash
# Speculative decoding on the H200 (<= 150 s): `halserve bench spec` on the Llama-3.1-8B shape
# (bf16, 128-token prompts, 64 new tokens; a callable proposer drafting the target's own
# greedy continuation, each token right with probability alpha; alpha 0.3/0.6/0.8/0.95,
# k 2/4/8), batch 1 as served (graphs, cuBLAS), and batch 16 with the plain and the
# speculative engine both in batch-invariant mode. Last time bf16 drift left batch 16 at
# acceptance ~0.05 whatever alpha: the oracle drafted plain decode's continuation, which the
# verify steps (other GEMM shapes) did not compute. Now the oracle's continuation comes from
# an untimed run of the speculative engine itself at each k, and batch 16's GEMMs are
# row-invariant; rows whose verify-path greedy differs from plain decode's are printed
# (drifted_rows). Then the EAGLE-head tests on the cuda backend.
# Run from the repo root: bash bench/device/spec.sh   (logs and spec_8b.json in $OUT)
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TRANSFORMERS_VERBOSITY=error
unset TRITON_INTERPRET
. "$(dirname "$0")/step.sh"
STEP_TAIL=32 step spec_bench_8b 112 python3 -m halserve.cli bench spec --preset llama-8b --input-len 128 \
    --output-len 64 --batches 1,16 --batch-invariant 16 --no-ngram --json "$OUT/spec_8b.json"
step spec_eagle_tests 30 python3 -m pytest -q -p no:cacheprovider tests/engine/test_spec_eagle.py \
    -k "random_head or right_position or copies or one_pass or preemption"
echo "--- [$SECONDS s] done"
