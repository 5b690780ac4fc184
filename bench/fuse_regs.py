"""Compile the fused rotary + write_kv Triton kernel (hal/triton/fused.py) for sm_90 and for
an AMD arch on a machine without a GPU, as the launcher calls it at the model shapes, and
print registers, local memory (spills), 16-byte loads and barriers (sm_90), VGPRs / spills
(AMD). Exits 1 when a launch spills, has no barrier before its in-place stores, or fails to compile.

    python bench/fuse_regs.py [--arch gfx942]

Run without TRITON_INTERPRET (uses the triton wheel's ptxas/cuobjdump and its AMD backend).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from halserve.hal.quant import FP8_DTYPE  # noqa: E402
from halserve.hal.rocm.aot import Recorder, _signature  # noqa: E402
from halserve.hal.triton import fused  # noqa: E402

# (name, Hq, Hk, D, rot, dtype, fp8 cache[, q/k norm]): 1B and 8B Llamas, a 64-head model,
# partial rotary, Qwen3's heads with their q/k RMSNorm
SHAPES = [("qwen3 32/4 x 128 + q/k norm", 32, 4, 128, 128, torch.bfloat16, False, True),
          ("qwen3 fp8 kv + q/k norm", 32, 4, 128, 128, torch.bfloat16, True, True),
          ("llama-1b", 32, 4, 64, 64, torch.bfloat16, False), ("llama-8b", 32, 8, 128, 128, torch.bfloat16, False),
          ("llama-8b fp8 kv", 32, 8, 128, 128, torch.bfloat16, True), ("64 heads", 64, 8, 128, 128, torch.bfloat16,
                                                                       False),
          ("partial rot 96/48 fp16", 16, 16, 96, 48, torch.float16, False), ("fp32 8/2 x 64", 8, 2, 64, 64,
                                                                              torch.float32, False)]


def launch_of(hq, hk, d, rot, dtype, fp8, neox=True, norm=False):
    t, bs = 8, 16
    q, k, v = torch.randn(t, hq, d).to(dtype), torch.randn(t, hk, d).to(dtype), torch.randn(t, hk, d).to(dtype)
    cache = torch.zeros(2, 4, bs, hk, d, dtype=FP8_DTYPE if fp8 else dtype)
    rec = Recorder()
    with rec.active():
        w = torch.ones(d, dtype=dtype) if norm else None
        fused.rotary_write_kv(torch.arange(t), q, k, v, torch.randn(4096, rot), neox, cache, torch.arange(t),
                              0.5, 2.0, w, w, 1e-6)
    return rec.calls[0]


def compile_amd(arch: str, fn, args, kwargs) -> dict:
    """VGPRs and VGPR/SGPR spills of one recorded launch compiled for ``arch``."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs, attrs, options = _signature(fn, args, kwargs)
    asm = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("hip", arch, 64),
                         options=options).asm["amdgcn"]
    get = lambda key: int(m.group(1)) if (m := re.search(r"\." + key + r":\s+(\d+)", asm)) else -1  # noqa: E731
    return dict(vgprs=get("vgpr_count"), spills=max(get("vgpr_spill_count"), 0) + max(get("sgpr_spill_count"), 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", default=[], help="AMD arch(s) besides sm_90, e.g. gfx942")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from skinny_regs import compile_sm90

    bad = 0
    for name, hq, hk, d, rot, dtype, fp8, *norm in SHAPES:
        for neox in (True, False):
            fn, a, kw = launch_of(hq, hk, d, rot, dtype, fp8, neox, bool(norm))
            tag = f"{name:<28} {'neox' if neox else 'gptj'}"
            try:
                r = compile_sm90(fn, a, kw)
                bad += r["local"] != 0 or r["bar_sync"] == 0  # no barrier: the in-place store races a partner's load
                print(f"sm_90  {tag}: regs {r['regs']}, local {r['local']} B, 16-byte loads {r['ld16']}, "
                      f"bar.sync {r['bar_sync']}", flush=True)
            except Exception as e:
                bad += 1
                print(f"sm_90  {tag}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            for arch in args.arch:
                try:
                    r = compile_amd(arch, fn, a, kw)
                    bad += r["spills"] != 0
                    print(f"{arch} {tag}: vgprs {r['vgprs']}, spills {r['spills']}", flush=True)
                except Exception as e:
                    bad += 1
                    print(f"{arch} {tag}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print("no spills, all compiled" if not bad else f"{bad} launches spilled or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
