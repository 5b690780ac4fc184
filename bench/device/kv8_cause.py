"""Why the earlier Triton fp8 KV store (7be567b: round in fp32 adds, then cast with the
hardware's cvt) differed from torch's rule on the H200 in 8-52 of ~10k bytes: rerun that
rounding here and split the blame. (a) its fp32 result against torch's e4m3 value as fp32
(the add trick), (b) the byte its cast stores against torch's byte for the same inputs
(trick + cvt), (c) the byte the cvt stores for torch's own (exact) e4m3 values (the cvt
alone), (d) the integer encoder the kernel uses now; and torch's cast itself, on the CPU and
on the GPU, against the float64 definition of round to nearest even (tests/hal/test_kv_fp8.py's
_rne_e4m3_bytes): if torch's CPU cast is what deviated there, these say so. Inputs: every bf16
and fp16 bit pattern, and N(0,1) times 10^[-4, 3] in fp32, each at scale 1.

    python bench/device/kv8_cause.py      (a GPU, or TRITON_INTERPRET=1 on a CPU; ~10 s)
"""
from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from halserve.hal.triton.elementwise import _e4m3_byte, _is_negative
from tests.hal.test_kv_fp8 import _rne_e4m3_bytes

FP8 = torch.float8_e4m3fn


@triton.jit
def _old_round_e4m3(x):  # 7be567b's rounding, verbatim
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum((bits >> 23) & 0xFF, 121)
    c = (((e + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = tl.abs((x + c) - c)
    return tl.where(bits < 0, -r, r)


@triton.jit
def _probe(x_ptr, exact_ptr, rounded_ptr, old_ptr, cvt_ptr, new_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m)
    xf = tl.minimum(tl.maximum(x.to(tl.float32) * 1.0, -448.0), 448.0)
    r = _old_round_e4m3(xf)
    tl.store(rounded_ptr + i, r, mask=m)
    tl.store(old_ptr + i, r.to(old_ptr.dtype.element_ty), mask=m)
    tl.store(cvt_ptr + i, tl.load(exact_ptr + i, mask=m).to(cvt_ptr.dtype.element_ty), mask=m)
    tl.store(new_ptr + i, _e4m3_byte(x.to(tl.float32) * 1.0, _is_negative(x)).to(tl.uint8), mask=m)


def _examples(x, got, want, k=6):
    idx = (got != want).nonzero().flatten()[:k].tolist()
    return [{"x": float(x[i]), "x_bits": hex(int(x.view(torch.int16 if x.element_size() == 2 else torch.int32)[i]) & 0xFFFFFFFF),
             "got": hex(int(got[i])), "torch": hex(int(want[i]))} for i in idx]


def main() -> int:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    pats = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    inputs = {"bf16_all": pats.view(torch.bfloat16), "fp16_all": pats.view(torch.float16),
              "fp32_randn": torch.randn(1 << 18, generator=g) * 10 ** (torch.rand(1 << 18, generator=g) * 7 - 4)}
    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
              "triton": triton.__version__, "torch": torch.__version__}
    for name, x in inputs.items():
        finite = torch.isfinite(x.float())
        x = x[finite]  # NaN/inf: the old kernel's clamp made no claim for NaN's sign
        want = x.float().clamp(-448, 448).to(FP8)  # torch's rule at scale 1, on the CPU
        n = x.numel()
        xd = x.to(dev)
        rounded = torch.empty(n, device=dev)
        old = torch.empty(n, device=dev, dtype=FP8)
        cvt = torch.empty(n, device=dev, dtype=FP8)
        new = torch.empty(n, device=dev, dtype=torch.uint8)
        _probe[(triton.cdiv(n, 1024),)](xd, want.float().to(dev), rounded, old, cvt, new, n, BLOCK=1024)
        wb = want.view(torch.uint8)
        rb = rounded.cpu()
        a = (rb.view(torch.int32) != want.float().view(torch.int32))
        rep = {"n": n,
               "a_add_trick_fp32_differs": int(a.sum()),
               "b_trick_then_cvt_byte_differs": int((old.cpu().view(torch.uint8) != wb).sum()),
               "c_cvt_of_exact_values_differs": int((cvt.cpu().view(torch.uint8) != wb).sum()),
               "d_integer_encoder_differs": int((new.cpu() != wb).sum())}
        rne = _rne_e4m3_bytes(x)
        gpu_cast = x.to(dev).float().clamp(-448, 448).to(FP8).view(torch.uint8).cpu()
        rep["torch_cpu_cast_vs_rne_differs"] = int((wb != rne).sum())
        rep["torch_dev_cast_vs_rne_differs"] = int((gpu_cast != rne).sum())
        rep["integer_encoder_vs_rne_differs"] = int((new.cpu() != rne).sum())
        rep["examples_torch_cpu_vs_rne"] = _examples(x, wb, rne)
        rep["examples_a"] = [{"x": float(x[i]), "trick": float(rb[i]), "torch": float(want[i].float())}
                             for i in a.nonzero().flatten()[:6].tolist()]
        rep["examples_b"] = _examples(x, old.cpu().view(torch.uint8), wb)
        rep["examples_c"] = _examples(want.float(), cvt.cpu().view(torch.uint8), wb)
        report[name] = rep
        print(name, {k: v for k, v in rep.items() if not k.startswith("examples")}, flush=True)
    print(json.dumps(report, indent=1))
    bad = any(report[k]["d_integer_encoder_differs"] for k in inputs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
