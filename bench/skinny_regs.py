"""Compile skinny-GEMM configs for sm_90 on a machine without a GPU and print each one's
registers, local memory (spills), shared memory and whether its weight loads are 16-byte
vectors: the occupancy side of a config, before any device time is spent on it.

    python bench/skinny_regs.py                       # the fp8_new sweep's candidates, 8B, M = 1
    python bench/skinny_regs.py --m 4 --shape down    # other rows / shape

Uses the triton wheel's own ptxas and cuobjdump. Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from halserve.hal.quant import quantize  # noqa: E402
from halserve.hal.rocm.aot import _TYPES, Recorder  # noqa: E402
from halserve.hal.triton import configs, skinny  # noqa: E402


def launch_of(m, n, k, cfg, act="per_token", wscheme="per_channel", bias=False):
    """(kernel, args, kwargs) of the skinny launch for this config, recorded, not run."""
    x = torch.randn(m, k, dtype=torch.bfloat16)
    q, s = quantize(torch.randn(n, k, dtype=torch.bfloat16) * 0.02, "fp8", wscheme)
    b = torch.randn(n, dtype=torch.bfloat16) if bias else None
    rec = Recorder()
    with rec.active():
        skinny.skinny_matmul(x, q, s, act, b, cfg={key: v for key, v in cfg.items() if key != "PDL"})
    fn, args, kwargs = next(c for c in rec.calls if getattr(c[0], "__name__", "") == "_skinny_kernel")
    kwargs = dict(kwargs, PDL=bool(cfg.get("PDL")))
    if kwargs.get("A_FP8"):  # what the launcher picks on sm_89+ (it sees a CPU tensor here)
        kwargs["FP8_DOT"] = True
    return fn, args, kwargs


def compile_sm90(fn, args, kwargs) -> dict:
    """Compile one recorded launch for sm_90 with the specializations its launcher makes (ints
    == 1 as constexprs, multiples of 16 as divisible) and read back registers, local memory
    (spills), shared memory, 16-byte global loads, wgmma and the PDL wait. Also used by
    bench/device/biatt_sm90.py and bichunk_sm90.py."""
    kwargs = dict(kwargs)
    opts = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages", 3)}
    if kwargs.get("PDL"):
        opts["launch_pdl"] = True
    if "enable_fp_fusion" in kwargs:  # a launch option (batch-invariant attention turns contraction off)
        opts["enable_fp_fusion"] = kwargs.pop("enable_fp_fusion")
    bound = dict({p.name: a for p, a in zip(fn.params, args)}, **kwargs)
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name], attrs[(i,)] = "*" + _TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i1" if isinstance(v, bool) else ("i32" if -2**31 <= v < 2**31 else "i64")
            if not isinstance(v, bool) and v % 16 == 0 and v != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kern = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        use = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
    get = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", use)) else -1  # noqa: E731
    ptx = kern.asm["ptx"]
    return dict(regs=get("REG"), local=get("LOCAL"), shared=kern.metadata.shared,
                ld16=len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx)), pdl="griddepcontrol.wait" in ptx,
                wgmma="wgmma" in ptx, mma="wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none"),
                fma_f32=len(re.findall(r"\bfma\.\w+\.f32\b", ptx)),
                bar_sync=len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)))


def check_table() -> int:
    configs._device_sms = lambda index=0: 132  # H200
    cases = []
    with configs.forced_arch("sm90"):
        for (wt, rows, n, k) in configs.SKINNY_TUNED["sm90"]:
            if wt == "fp8":
                cases += [(m, n, k) for m in {1: (1,), 4: (2, 4), 16: (5, 16)}[rows]]
        for (wt, rows) in configs.SKINNY_RULE:
            if wt == "fp8":
                cases += [(m, n, k) for m in {1: (1,), 4: (3,), 16: (16,)}[rows] for n, k in ((389, 257), (5120, 13824))]
        cases = [(m, n, k, configs.skinny_config(m, n, k, 1)) for m, n, k in cases]
    bad = 0
    for m, n, k, cfg in cases:
        for act, wscheme, bias in (("per_token", "per_channel", False), ("per_token", "per_channel", True),
                                   ("per_tensor", "per_tensor", False)):
            try:
                got = compile_sm90(*launch_of(m, n, k, cfg, act, wscheme, bias))
            except Exception as e:  # noqa: BLE001 - counted and printed
                bad += 1
                got = f"ERROR {type(e).__name__}: {e}"[:400]
            print(f"M={m} N={n} K={k} {act}/{wscheme} bias={bias} {cfg} {got}", flush=True)
    print(f"[skinny_regs] {len(cases) * 3 - bad}/{len(cases) * 3} compiled for sm_90", flush=True)
    return 1 if bad else 0


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import skinny_gemm as sg

    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--model", default="8b", choices=list(sg.SHAPES))
    ap.add_argument("--shape", default="qkv")
    ap.add_argument("--table", action="store_true", help="instead: every configs.SKINNY_TUNED entry at its shape "
                    "and every SKINNY_RULE at odd shapes, per-token and per-tensor activations, with and "
                    "without bias (the cuda backend's default fp8 decode path); exit 1 on any failure")
    args = ap.parse_args()
    if args.table:
        return check_table()
    n, k = sg.SHAPES[args.model][args.shape]
    configs._device_sms = lambda index=0: 132  # H200
    with configs.forced_arch("sm90"):
        tuned = configs.skinny_config(args.m, n, k, 1)
        cands = [(None, tuned)] + sg.fp8_new_space(args.m, tuned)
    seen = []
    for per_sm, c in cands:
        cfg = dict(c, SPLITS=c.get("SPLITS") if per_sm is None else 2)  # registers hardly depend on it
        if cfg in seen:
            continue
        seen.append(cfg)
        try:
            print(cfg, compile_sm90(*launch_of(args.m, n, k, cfg)), flush=True)
        except Exception as e:  # noqa: BLE001 - one failing config is a result
            print(cfg, f"ERROR {type(e).__name__}: {e}"[:400], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
