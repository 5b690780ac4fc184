"""Check the Gluon kernels' results on a GPU at hand, against float64 references.

On an AMD GPU ``--arch`` is the device's (gfx942/gfx950: the MFMA layouts run). On an NVIDIA
GPU ``--arch sm90`` instantiates the same kernel bodies with NVIDIA mma layouts: indexing,
masking, the block-table walk, online softmax and scaling are checked; the AMD layouts'
lowering is not (that needs AMD hardware). ``python -m halserve.hal.rocm.gluon_check --arch sm90``.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from halserve.hal.rocm import gluon_kernels as gk


def nmse(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float(((got - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=1e-300))


def ref_decode(q, kv, seq_lens, bt, scale):
    B, HQ, D = q.shape
    HK, page = kv.shape[-2], kv.shape[2]
    G = HQ // HK
    out = torch.empty(B, HQ, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        pos = torch.arange(n, device=q.device)
        blk = bt[b, pos // page].long()
        k = kv[0][blk, pos % page].double()  # [n, HK, D]
        v = kv[1][blk, pos % page].double()
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


def check_decode(arch: str, dtype: torch.dtype, B: int, HQ: int, HK: int, D: int, page: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.randint(1, 700, (B,), generator=g, device="cuda").to(torch.int32)
    lens[0] = 1
    per = (int(lens.max()) + page - 1) // page
    nblk = B * per + 3
    kv = torch.randn(2, nblk, page, HK, D, generator=g, device="cuda").to(dtype)
    bt = torch.randperm(nblk, generator=g, device="cuda")[: B * per].view(B, per).to(torch.int32)
    q = torch.randn(B, HQ, D, generator=g, device="cuda").to(dtype)
    scale = D ** -0.5
    out = gk.decode_attention(q, kv, lens, bt, scale, arch)
    e = nmse(out, ref_decode(q, kv, lens, bt, scale))
    return dict(kernel="decode_attention", dtype=str(dtype), B=B, HQ=HQ, HK=HK, D=D, page=page, nmse=e,
                ok=bool(e <= 2e-4 and torch.isfinite(out).all()))


def check_fp8(arch: str, M: int, N: int, K: int, per_row: bool, per_col: bool, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    fp8 = torch.float8_e4m3fnuz if arch == "gfx942" else torch.float8_e4m3fn
    a = (torch.randn(M, K, generator=g, device="cuda") * 4).to(fp8)
    b = (torch.randn(N, K, generator=g, device="cuda") * 4).to(fp8)
    sa = torch.rand(M if per_row else 1, generator=g, device="cuda") + 0.5
    sb = torch.rand(N if per_col else 1, generator=g, device="cuda") + 0.5
    out = gk.fp8_gemm(a, sa, b, sb, torch.float32, arch)
    ref = (a.double() @ b.double().t()) * sa.double().reshape(-1, 1) * sb.double().reshape(1, -1)
    e = nmse(out, ref)
    return dict(kernel="fp8_gemm", M=M, N=N, K=K, per_row=per_row, per_col=per_col, nmse=e,
                ok=bool(e <= 1e-10 and torch.isfinite(out).all()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True, help="gfx942 | gfx950 (on AMD) | sm90 (NVIDIA instantiation)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    checks = []
    plan = [lambda: check_decode(a.arch, torch.bfloat16, 5, 32, 8, 128, 16, 0),
            lambda: check_decode(a.arch, torch.float16, 3, 16, 2, 64, 32, 1),
            lambda: check_decode(a.arch, torch.bfloat16, 2, 8, 1, 128, 16, 2),
            lambda: check_fp8(a.arch, 256, 4096, 4096, True, True, 3),
            lambda: check_fp8(a.arch, 37, 1031, 769, False, True, 4),
            lambda: check_fp8(a.arch, 1, 512, 4096, False, False, 5)]
    for f in plan:
        try:
            r = f()
        except Exception as e:  # one failed check must not hide the others
            r = dict(kernel="?", ok=False, error=f"{type(e).__name__}: {str(e)[-800:]}")
        print(json.dumps(r), flush=True)
        checks.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(checks, f, indent=1)
    bad = sum(not c["ok"] for c in checks)
    print(f"gluon {a.arch}: {len(checks) - bad}/{len(checks)} checks passed", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
