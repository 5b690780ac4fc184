#!/usr/bin/env bash
# BIATT (issue 20, batch-invariant mode nearly free at batch 64), about 200 s on one H200:
#  1. the batch-invariance tests on the GPU: the GEMM's prefill form (splits added in the
#     program, tests/hal/test_bi_gemm.py) keeps a row's bits at
#     M = 1/64/300/4096 (tests/gpu/test_bi_gemm_gpu.py), batch-invariant decode attention on
#     the decode tile bitwise alone / in batches / mixed with prefill / under a graph bound, in
#     bf16 (tests/hal/test_bi_attention.py), the Triton kernel tests' batch-invariant cases,
#     and the engine's bitwise tests on cuda (logits of a prompt alone vs in batches of 1-64,
#     greedy through LLM.generate, speculative decoding in batch-invariant mode);
#  2. the 8B end to end, bf16 vs bf16 batch-invariant at batch 1 and 64, with the kernel
#     table of one decode step (--profile);
#  3. if time is left, the batch-invariant GEMM's prefill forms at M = 4096 against cuBLAS, each
#     with whether sampled rows keep their M = 1 bits (bench/device/biatt_forms.py).
#   OUT=<dir> bash bench/device/biatt.sh
. "$(dirname "$0")/step.sh"
stage_env
git log --oneline -1 > "$OUT/biatt_commit.txt" 2>/dev/null
STEP_TAIL=30 step biatt_tests 80 python3 -m pytest -q -p no:cacheprovider -rfE --durations=12 \
    tests/gpu/test_bi_gemm_gpu.py tests/hal/test_bi_gemm.py tests/hal/test_bi_attention.py \
    tests/hal/test_triton_kernels.py::test_attention tests/hal/test_triton_kernels.py::test_attention_row_invariance \
    tests/hal/test_triton_kernels.py::test_attention_batch_invariant_decode_splits \
    tests/hal/test_triton_kernels.py::test_persistent_matmul_rows_invariant \
    tests/gpu/test_cuda_backend.py::test_batch_invariant_logits_bitwise \
    tests/gpu/test_cuda_backend.py::test_batch_invariant_greedy_through_engine \
    tests/engine/test_spec_decode.py::test_batch_invariant_with_speculation
STEP_TAIL=20 step biatt_e2e_8b 100 python3 bench/e2e_decode.py --preset llama-8b --variants bf16,bf16-bi \
    --batches 64 --bi-batches 64 --profile 6 --json "$OUT/biatt_e2e_8b.json"
left=$((198 - SECONDS))
if [ "$left" -ge 15 ]; then
  STEP_TAIL=30 step biatt_gemm_forms "$left" python3 bench/device/biatt_forms.py --budget $((left - 12)) \
      --json "$OUT/biatt_gemm_forms.json"
else
  echo "[biatt] no time left for the GEMM forms"
fi
echo "[biatt] done in ${SECONDS}s"
