#!/usr/bin/env bash
# BICHUNK (issue 20, session 5: batch-invariant mode also chunk-invariant), about 110 s on one
# H200, run from the repo root:   OUT=<dir> bash bench/device/bichunk.sh
#  1. bitwise on the GPU (bf16 and fp32, D 128, 256-key spans): a token's attention output as
#     a decode row = in one prefill = in any chunk split (1-token chunks, span-crossing chunks)
#     beside other rows, GQA 4 and 3, a sliding window, an fp8 cache (tests/hal/test_bi_attention.py);
#  2. the engine on cuda: a 600-token prompt's tokens and logprobs alone = with 1-token chunks
#     beside other requests = after preemption and recompute (bf16 with CUDA graphs, fp32 eager;
#     tests/gpu/test_bi_chunking_gpu.py);
#  3. what it costs: batch-invariant attention vs the normal kernels, prefill 1024/4096, a mixed
#     step, decode b1/b64, 8B shape bf16, with roofline fractions (bench/device/bichunk_perf.py);
#  4. (CPU only, also runs without a GPU) the sm_90 compile check: no spills, decode and
#     prefill-row launches on one tile and MMA kind, no fma.f32 in 16-bit launches.
. "$(dirname "$0")/step.sh"
stage_env
git log --oneline -1 > "$OUT/bichunk_commit.txt" 2>/dev/null
STEP_TAIL=20 step bichunk_attn_tests 35 python3 -m pytest -q -p no:cacheprovider -rfE --durations=6 \
    tests/hal/test_bi_attention.py
STEP_TAIL=20 step bichunk_engine 45 python3 -m pytest -q -p no:cacheprovider -rfE --durations=4 \
    tests/gpu/test_bi_chunking_gpu.py
STEP_TAIL=12 step bichunk_perf 20 python3 bench/device/bichunk_perf.py --json "$OUT/bichunk_perf.json"
STEP_TAIL=6 step bichunk_sm90 15 env CUDA_VISIBLE_DEVICES= python3 bench/device/bichunk_sm90.py
echo "[bichunk] done in ${SECONDS}s"
