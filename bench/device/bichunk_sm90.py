"""Compile-only check for sm_90 (no GPU needed) of batch-invariant attention's chunk-invariant
form (issue 20, session 5): every launch it makes on the 8B shape (Hq 32, Hk 8, D 128, bf16)
is recorded through the real launcher under the H200's configs, compiled with the triton
wheel's ptxas and its options (``enable_fp_fusion=False`` included), and reported with
registers, local memory (spills) and shared memory. Also checked, the two claims the
bitwise argument rests on:

- the decode launch and the prefill-row launch use the same tile (BLOCK_M, BLOCK_N, warps,
  stages) and the same MMA kind (wgmma or mma.sync, read from the PTX);
- no 16-bit launch of batch-invariant attention has an fma.f32 (fp contraction off: the span
  merge and the tile loop are their IEEE operations wherever they sit; an fp32 launch's dot
  is FMAs itself, in a fixed order along K).

Exit status 1 if a launch fails to compile, spills, or a claim does not hold.

    python bench/device/bichunk_sm90.py        (without TRITON_INTERPRET)
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from bench import skinny_regs  # noqa: E402
from bench.device.biatt_sm90 import attn_launch  # noqa: E402
from halserve.hal.rocm.aot import Recorder  # noqa: E402
from halserve.hal.triton import configs  # noqa: E402

SM90_SHARED = 227 * 1024


SCENARIOS = {
    "decode b64 graph bound 1168 + prefill": ([1] * 64 + [300], 1168, {}),
    "decode b1 + 1024-token prefill": ([1, 1024], 1100, {}),
    "sliding window": ([1, 40], 900, dict(window=256)),
    "fp32": ([1, 9], 300, dict(dtype=torch.float32)),
}


def main() -> int:
    configs._device_sms = lambda index=0: 132  # H200
    bad = 0
    for name, (qlens, ctx, kw) in SCENARIOS.items():
        rec = Recorder()
        with configs.forced_arch("sm90"), rec.active():
            attn_launch(qlens, ctx, True, **kw)()
        tiles = {}
        for fn, args, kwargs in rec.calls:
            short = {c: kwargs.get(c) for c in ("BLOCK_M", "BLOCK_N", "BLOCK_Q", "FIXED_SPAN", "SPAN_LOOP", "BY_SEQ",
                                                "num_warps", "num_stages", "enable_fp_fusion") if c in kwargs}
            try:
                r = skinny_regs.compile_sm90(fn, args, kwargs)
            except Exception as e:  # noqa: BLE001 - a failing compile is the result
                bad += 1
                print(f"BAD {name}: {fn.__name__} {short}: {type(e).__name__}: {e}"[:600], flush=True)
                continue
            # an fp32 (IEEE) dot is FMAs itself, in a fixed order along K: the claim is for 16-bit
            ok = r["local"] == 0 and r["shared"] <= SM90_SHARED and (r["fma_f32"] == 0 or kwargs.get("IEEE"))
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {name}: {fn.__name__} {short} -> {r}", flush=True)
            if fn.__name__ == "_attn_kernel":
                role = "decode" if kwargs.get("FIXED_SPAN") else "prefill"
                tiles[role] = (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"],
                               r["mma"])
        if len(tiles) == 2 and tiles["decode"] != tiles["prefill"]:
            bad += 1
            print(f"BAD {name}: decode tile {tiles['decode']} != prefill-row tile {tiles['prefill']}", flush=True)
    print(f"[bichunk_sm90] {bad} bad", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
