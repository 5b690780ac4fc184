#!/usr/bin/env bash
# Issue 22's MoE goal on the AMX host (16 threads, CPU only, <= 150 s of step limits):
#   1. amxmoe_layer: the fused MoE kernel alone (moe.c through the backend's _moe_small), Qwen3-30B-A3B's
#      expert shape (hidden 2048, 768 wide, 128 experts, top 8), 4 layers' worth of experts cycled so
#      nothing stays in L3, random routing: us per layer and % of the measured read roofline for the
#      routed experts' bytes, bf16 and int8 weights, 1 / 4 / 8 tokens
#   2. amxmoe_e2e: `halserve bench cpu --shape qwen3-moe` (4 layers, 64 experts: the bytes a token reads
#      per layer are the real model's) batch-1 decode beside llama.cpp BF16 on the same weights
#   3. amxmoe_tests: python -m pytest -q tests/hal/test_cpu_amx*.py -k moe, the AMX tier (the other tiers run in CI)
# Run from the repo root: bash bench/device/amxmoe.sh   (THREADS=2 for a dry run on a small box)
set -u
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-/tmp/site:.} PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HALSERVE_CACHE_DIR=${HALSERVE_CACHE_DIR:-/tmp/halserve-cache}
unset TRITON_INTERPRET
T=${THREADS:-16}
STEP_TAIL=30
. "$(dirname "$0")/step.sh"
echo "amxmoe: $(date -u '+%Y-%m-%d %H:%M UTC'), $T threads, $(lscpu | grep -E 'Model name' | sed 's/  */ /g')"
echo "flags: $(grep -o -w 'amx_[a-z0-9]*\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '); load $(cut -d' ' -f1-3 /proc/loadavg)"

step amxmoe_layer 40 python3 - "$T" "${AMXMOE_EXPERTS:-128}" <<'EOF'
import dataclasses, statistics, sys, time
import torch
from halserve.bench.cpu import read_bandwidth_gbs
from halserve.hal.cpu_amx.backend import CpuAmxBackend
from halserve.hal.interface import MoeSpec
from halserve.hal.routing import route

torch.set_num_threads(int(sys.argv[1]))
b = CpuAmxBackend()
H, I, E, K, NL = 2048, 768, int(sys.argv[2]), 8, 4
g = torch.Generator().manual_seed(0)
blk = torch.randn(1 << 22, generator=g) * 0.02


def rand_w(*shape):  # random values tiled (the kernel's speed does not depend on them)
    w = torch.empty(*shape, dtype=torch.bfloat16).view(-1)
    for i in range(0, w.numel(), blk.numel()):
        n = min(blk.numel(), w.numel() - i)
        w[i:i + n] = blk[:n]
    return w.view(*shape)


bw = read_bandwidth_gbs()
print(f"tier {b.tier}, {b.threads} threads, read roofline {bw:.1f} GB/s (1 GiB sum, best of 8)")
spec = MoeSpec(top_k=K)
for scheme in ("none", "int8"):
    first = tuple(b.pack_weight(rand_w(*s), scheme) for s in ((E, 2 * I, H), (E, H, I)))
    # copies, not new packs: int8 quantization of 4 x 1.2 GB would take much of the step
    layers = [first] + [tuple(dataclasses.replace(w, weight=w.weight.clone(), extra={}) for w in first)
                        for _ in range(NL - 1)]
    kind = b._moe_kind(*layers[0], torch.bfloat16)
    for t in (1, 4, 8):
        calls = []
        for i in range(64):
            tw, ids = route(torch.randn(t, E, generator=g), spec)
            calls.append((torch.randn(t, H, generator=g).to(torch.bfloat16), tw, ids, *layers[i % NL]))
        used = statistics.mean(len(set(c[2].flatten().tolist())) for c in calls)
        nbytes = used * 3 * H * I * (2 if scheme == "none" else 1)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            for x, tw, ids, w13, w2 in calls:
                b._moe_small(x, tw, ids, w13, w2, kind, None)
            times.append((time.perf_counter() - t0) / len(calls))
        s = statistics.median(times[1:])
        print(f"{'bf16' if scheme == 'none' else scheme:5s} T={t}: {s * 1e6:7.0f} us/layer, {used:5.1f} experts, "
              f"{nbytes / s / 1e9:6.1f} GB/s = {nbytes / s / 1e9 / bw * 100:5.1f}% of the read roofline")
    del layers
EOF

PEER=$(peer_llamacpp /tmp/amxmoe-llamacpp)
[ -z "$PEER" ] && echo "no llama.cpp peer (.carry/peers/ archives missing): llama.cpp row skipped"
W=/tmp/amxmoe-work
[ "$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)" -gt 20 ] 2>/dev/null && W=/dev/shm/amxmoe-work
mkdir -p $W
step amxmoe_e2e 80 python3 -m halserve.cli bench cpu --threads "$T" --shape qwen3-moe --layers 4 --experts 64 \
  --vocab 32000 --backends cpu_amx --quant none --no-hf --input-len 32 --output-len 32 --batch 0 --gguf bf16 \
  --work-dir $W ${PEER:+--llama-cpp $PEER} --json "$OUT/amxmoe_e2e.json" ${AMXMOE_EXTRA:-}
step amxmoe_tests 30 python3 -m pytest -q -p no:cacheprovider tests/hal/test_cpu_amx*.py -k "moe and not avx512 and not avx2"
rm -rf /dev/shm/amxmoe-work  # give the RAM back
echo "amxmoe: done at $SECONDS s"
