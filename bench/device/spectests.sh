#!/usr/bin/env bash
# Issue 21 on the H200: the speculative-decoding test files whole on the cuda backend (greedy
# token equality per family, seeded sampling, the statistical test, batch invariance, verify
# graphs, EAGLE heads, preemption, offload). About 250 s.
. "$(dirname "$0")/step.sh"
stage_env
STEP_TAIL=30 step spec_tests 280 python3 -m pytest -q -p no:cacheprovider -rs --durations=15 \
    tests/engine/test_spec_decode.py tests/engine/test_spec_eagle.py tests/engine/test_spec_graphs.py
echo "--- [$SECONDS s] done"
