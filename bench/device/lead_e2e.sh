#!/usr/bin/env bash
# Issue 20's table end to end: 8B shape, bf16 / fp8 / batch-invariant, batch 1 and 64, HF beside.
python3 bench/e2e_decode.py --preset llama-8b --variants "${E2E_VARIANTS:-bf16,fp8,bf16-bi,fp8-bi}" --hf-peer --json "$OUT/e2e_8b.json"
