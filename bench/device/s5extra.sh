#!/usr/bin/env bash
# Session 5's third sitting (<= 500 s), if device time is left after s5bench.sh and s5final.sh:
#   GPU lane, cores 0-3:  bichunk.sh (chunk-invariance on the GPU: tests, its cost beside the normal
#                         attention kernels, the sm_90 compile check), fuse.sh (rotary_write_kv: cuda
#                         conformance --perf, its GPU tests, the 1B batch-1 kernel table), host32.sh (the
#                         engine's host us a decode step at 1-64 rows: CPU only, fine on these 4 cores);
#   CPU lane, cores 4-15: THREADS=12: fuse_cpu.sh (batch-1 decode, fused rotary_write_kv vs the two ops),
#                         amxmoe.sh (fused MoE decode beside llama.cpp), nativeb.sh (native and cpu_amx
#                         batched, interleaved beside HF; its sequential half is cut by the lane's limit).
. "$(dirname "$0")/step.sh"
stage_env
T0=$SECONDS
cpu_lane 490 fuse_cpu:150 amxmoe:120 nativeb:215
run_lane 0-3 490 bichunk:125 fuse:150 host32:90
wait
show_lanes bichunk fuse host32 fuse_cpu amxmoe nativeb
