"""Compile-only check for sm_90, on a machine without a GPU: every launch the batch-invariant
attention and GEMM make on the 8B shapes (and the normal attention launches that share their
kernel source) is recorded through the real launchers under the H200's configs (132 SMs),
compiled with the triton wheel's ptxas, and reported with registers, local memory (spills)
and shared memory. Exit status 1 if a launch fails to compile, spills, or needs more shared
memory than an sm_90 block may have.

    python bench/device/biatt_sm90.py        (without TRITON_INTERPRET)
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from bench.skinny_regs import compile_sm90  # noqa: E402
from halserve.hal.rocm.aot import Recorder  # noqa: E402
from halserve.hal.triton import attention as AT  # noqa: E402
from halserve.hal.triton import configs  # noqa: E402
from halserve.hal.triton import matmul as MM  # noqa: E402

SM90_SHARED = 227 * 1024  # largest dynamic shared memory of one sm_90 block


def attn_launch(qlens, ctx, bi, dtype=torch.bfloat16, window=None, graph=False):
    """One attention call of the 8B's heads (32/8 x 128, block 16) over ``qlens`` query rows of
    ``ctx`` keys each, zeros: a thunk to record its launches."""
    HQ, HK, D, BS = 32, 8, 128, 16
    B, T = len(qlens), sum(qlens)
    nblk = (ctx + BS - 1) // BS
    kv = torch.zeros(2, B * nblk, BS, HK, D, dtype=dtype)
    bt = torch.arange(B * nblk, dtype=torch.int32).view(B, nblk)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    seq = torch.full((B,), ctx, dtype=torch.int32)
    return lambda: AT.attention(torch.zeros(T, HQ, D, dtype=dtype), kv, cu, seq, bt, BS, max(qlens),
                                None if graph else ctx, D ** -0.5, window, batch_invariant=bi, kv_len_bound=ctx)


def scenarios():
    bf = torch.bfloat16
    attn = attn_launch

    def gemm(m, n, k, dtype=bf):
        return lambda: MM.persistent_matmul(torch.zeros(m, k, dtype=dtype), torch.zeros(n, k, dtype=dtype))

    yield "bi attention decode b64 (graph bound 1168)", attn([1] * 64, 1168, True, graph=True)
    yield "bi attention decode b1", attn([1], 1100, True)
    yield "bi attention mixed decode+prefill", attn([1, 300, 1, 17], 1100, True)
    yield "bi attention sliding window", attn([1, 40], 900, True, window=256)
    yield "bi attention fp32", attn([1, 9], 300, True, dtype=torch.float32)
    yield "attention decode b4 split-KV", attn([1] * 4, 2048, False)
    yield "attention decode b64", attn([1] * 64, 1100, False)
    yield "attention prefill", attn([1024, 1024], 1024, False)
    yield "attention short chunks over a prefix", attn([4, 2], 2000, False)
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)):
        yield f"bi gemm M=1 {n}x{k}", gemm(1, n, k)
        yield f"bi gemm M=4096 {n}x{k}", gemm(4096, n, k)
    yield "bi gemm M=300 fp32 (decode form)", gemm(300, 4096, 4096, torch.float32)
    yield "bi gemm M=1 fp32 lm_head", gemm(1, 128256, 4096, torch.float32)


def main() -> int:
    configs._device_sms = lambda index=0: 132  # H200
    seen, bad = set(), 0
    for name, thunk in scenarios():
        rec = Recorder()
        with configs.forced_arch("sm90"), rec.active():
            thunk()
        for fn, args, kwargs in rec.calls:
            consts = {p.name: kwargs.get(p.name, p.default) for p in fn.params if p.is_constexpr}
            key = (fn.__name__, repr(sorted(consts.items())), kwargs.get("num_warps"), kwargs.get("num_stages"))
            if key in seen:
                continue
            seen.add(key)
            short = {c: v for c, v in consts.items() if c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_Q", "SPLITS",
                                                               "SPLITS_INLINE", "NUM_SPLITS", "FIXED_SPAN",
                                                               "DECODE_ONLY", "SKIP_SINGLE", "BY_SEQ", "IEEE")}
            try:
                r = compile_sm90(fn, args, kwargs)
                ok = r["local"] == 0 and r["shared"] <= SM90_SHARED
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} {name}: {fn.__name__} {short} warps={kwargs.get('num_warps')} "
                      f"stages={kwargs.get('num_stages')} -> {r}", flush=True)
            except Exception as e:  # noqa: BLE001 - a failing compile is the result
                bad += 1
                print(f"BAD {name}: {fn.__name__} {short}: {type(e).__name__}: {e}"[:600], flush=True)
    print(f"[biatt_sm90] {len(seen)} launches compiled for sm_90, {bad} bad", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
