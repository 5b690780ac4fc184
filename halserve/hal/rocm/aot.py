"""Ahead-of-time compiles of every rocm kernel for an AMD target, with no AMD GPU present.

The real launchers run on CPU tensors shaped like the engine's calls (Llama-3-8B and
Qwen3-30B-A3B layers) under the arch's configs, while ``JITFunction.run`` is replaced by a
recorder: each launch is turned into ``triton.compile(ASTSource(fn, signature, constexprs),
target=GPUTarget("hip", arch, 64), options=<the config's num_warps, num_stages, waves_per_eu,
matrix_instr_nonkdim, kpack>)``. The Gluon kernels are compiled the same way from their own
launch descriptions. Run it in a process without TRITON_INTERPRET (the kernels must be
JITFunctions): ``python -m halserve.hal.rocm.aot --arch gfx942 [--json out.json]``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4nv",
          torch.float8_e4m3fnuz: "fp8e4b8", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
          torch.int8: "i8", torch.bool: "i1"}
FP8 = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}


@dataclass
class Compiled:
    scenario: str
    kernel: str
    ok: bool
    error: str = ""
    mfma: list[str] = field(default_factory=list)   # distinct v_mfma_* mnemonics
    fp8_cvt: list[str] = field(default_factory=list)  # distinct fp8 conversion mnemonics
    fp8_types: list[str] = field(default_factory=list)  # fp8 element types in the TTGIR
    lds_bytes: int = 0
    vgprs: int = 0
    options: dict = field(default_factory=dict)


def _signature(fn, args, kwargs):
    """(signature, constexprs, attrs, options) of one recorded launch."""
    from triton.backends.amd.compiler import HIPOptions

    opt_names = set(HIPOptions.__dataclass_fields__)
    bound = {p.name: a for p, a in zip(fn.params, args)}
    options = {}
    for k, v in kwargs.items():
        if k in bound or any(p.name == k for p in fn.params):
            bound[k] = v
        elif k in opt_names:
            options[k] = v
        else:
            raise KeyError(f"unknown launch kwarg {k}")
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and v != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif v is None:
            sig[p.name] = "constexpr"
            constexprs[p.name] = None
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
    return sig, constexprs, attrs, options


def _facts(k, scenario: str, name: str, options: dict) -> Compiled:
    asm = k.asm["amdgcn"]
    ttgir = k.asm.get("ttgir", "")
    mfma = sorted(set(re.findall(r"\b(v_mfma_\w+)", asm)))
    cvt = sorted(set(re.findall(r"\b(v_cvt_\w*(?:fp8|f8|bf8)\w*)", asm)))
    types = sorted(set(re.findall(r"\b(f8E4M3\w*|f8E5M2\w*)", ttgir)))
    vg = re.search(r"\.vgpr_count:\s+(\d+)", asm)
    return Compiled(scenario, name, True, mfma=mfma, fp8_cvt=cvt, fp8_types=types,
                    lds_bytes=int(k.metadata.shared), vgprs=int(vg.group(1)) if vg else 0, options=options)


class Recorder:
    """Replaces JITFunction.run: records (kernel, args, kwargs) and launches nothing."""

    def __init__(self):
        self.calls = []

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.jit import JITFunction

        orig = JITFunction.run

        def run(fn_self, *args, grid=None, warmup=False, **kwargs):
            self.calls.append((fn_self, args, kwargs))

        JITFunction.run = run
        try:
            yield self
        finally:
            JITFunction.run = orig


def compile_for(arch: str, fn, args, kwargs, scenario: str) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = getattr(fn, "__name__", str(fn))
    try:
        sig, constexprs, attrs, options = _signature(fn, args, kwargs)
        if getattr(fn, "is_gluon", lambda: False)():
            from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
        src = ASTSource(fn, sig, constexprs, attrs)
        k = triton.compile(src, target=GPUTarget("hip", arch, 64), options=options)
        return _facts(k, scenario, name, options)
    except Exception as e:  # reported per kernel, the test names it
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return Compiled(scenario, name, False, error=" | ".join(msg[-3:])[:400])


def scenarios(arch: str):
    """(name, thunk) pairs: each thunk calls real launchers the way the rocm backend does."""
    from halserve.hal.triton import attention as A
    from halserve.hal.triton import elementwise as E
    from halserve.hal.triton import fused as FU
    from halserve.hal.triton import matmul as M
    from halserve.hal.triton import moe as MO
    from halserve.hal.triton import sample as S

    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    fp8 = FP8[arch]
    H, HQ, HK, D, I, BS = 4096, 32, 8, 128, 14336, 16

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, generator=g).to(dtype)

    def attn(batch: int, q_len: int, ctx: int, bi: bool):
        T = batch * q_len
        nblk = (ctx + BS - 1) // BS
        kv = rnd(2, batch * nblk, BS, HK, D)
        bt = torch.arange(batch * nblk, dtype=torch.int32).view(batch, nblk)
        cu = torch.arange(batch + 1, dtype=torch.int32) * q_len
        seq = torch.full((batch,), ctx, dtype=torch.int32)
        return lambda: A.attention(rnd(T, HQ, D), kv, cu, seq, bt, BS, q_len, ctx, D ** -0.5,
                                   batch_invariant=bi, kv_len_bound=ctx)

    def fp8_linear(m: int, n: int, k: int, act: str):
        w = rnd(n, k).to(fp8)
        ws = torch.rand(n, generator=g) + 0.5
        x = rnd(m, k)
        if act == "none":
            return lambda: M.fp8_matmul(x, None, w, ws, bf)

        def run():
            q, s = (M.quant_fp8_per_token if act == "per_token" else M.quant_fp8_per_tensor)(x, fp8)
            M.fp8_matmul(q, s, w, ws, bf)
        return run

    def moe(T: int, weights):
        E_, k, h, i = 128, 8, 2048, 768
        w13 = rnd(E_, 2 * i, h, dtype=weights)
        w2 = rnd(E_, h, i, dtype=weights)
        s13 = torch.ones(1) if weights != bf else None
        s2 = torch.ones(E_, h) if weights != bf else None
        ids = torch.randint(0, E_, (T, k), generator=g)
        return lambda: MO.fused_moe(rnd(T, h), torch.rand(T, k, generator=g), ids, w13, s13, w2, s2)

    def rope():
        cache = torch.randn(4096, D, generator=g)
        return lambda: E.rotary(torch.arange(7), rnd(7, HQ, D), rnd(7, HK, D), cache, True)

    def sample():
        logits = torch.randn(4, 128256, generator=g)
        ones = torch.ones(4)
        seeds = torch.arange(4)
        return lambda: S.gumbel_argmax(logits, None, ones, seeds, seeds)

    return [
        ("attention decode split-KV (B=4, ctx=2048, bf16)", attn(4, 1, 2048, False)),
        ("attention prefill + cached prefix (B=2, q=96, ctx=640, bf16)", attn(2, 96, 640, False)),
        ("attention batch-invariant (B=4, ctx=1024, bf16)", attn(4, 1, 1024, True)),
        # chunk rows of batch-invariant mode loop over the decode spans in their program (another launch)
        ("attention batch-invariant prefill rows (B=2, q=16, ctx=1024, bf16)", attn(2, 16, 1024, True)),
        ("linear batch-invariant persistent GEMM (M=16, 4096x4096, bf16)",
         lambda: M.persistent_matmul(rnd(16, H), rnd(H, H))),
        ("linear fp8 W8A8 per-token (M=256, N=4096, K=4096)", fp8_linear(256, H, H, "per_token")),
        ("linear fp8 W8A8 per-tensor (M=48, N=14336, K=4096)", fp8_linear(48, I, H, "per_tensor")),
        ("linear fp8 W8A8 per-token decode (M=8, N=4096, K=14336)", fp8_linear(8, H, I, "per_token")),
        ("linear fp8 weight-only (M=64, N=4096, K=4096)", fp8_linear(64, H, H, "none")),
        ("moe bf16 (T=64, E=128, top-8, 2048/768)", moe(64, bf)),
        ("moe fp8 weight-only (T=512, E=128, top-8, 2048/768)", moe(512, fp8)),
        ("rms_norm + residual (T=8, H=4096, bf16)", lambda: E.rms_norm(rnd(8, H), rnd(H), 1e-6, rnd(8, H))),
        ("rotary neox (T=7, 32/8 heads, D=128, bf16)", rope()),
        ("rotary_write_kv (T=8, 32/8 heads, D=128, bf16, q/k norm)",
         lambda: FU.rotary_write_kv(torch.arange(8), rnd(8, HQ, D), rnd(8, HK, D), rnd(8, HK, D),
                                    torch.randn(4096, D, generator=g), True, rnd(2, 4, BS, HK, D), torch.arange(8),
                                    q_norm_weight=rnd(D), k_norm_weight=rnd(D))),
        ("rotary_write_kv (T=8, 32/8 heads, D=128, bf16, Llama: no q/k norm)",
         lambda: FU.rotary_write_kv(torch.arange(8), rnd(8, HQ, D), rnd(8, HK, D), rnd(8, HK, D),
                                    torch.randn(4096, D, generator=g), True, rnd(2, 4, BS, HK, D), torch.arange(8))),
        ("silu_and_mul (T=8, I=14336, bf16)", lambda: E.silu_and_mul(rnd(8, 2 * I))),
        ("write_kv (T=8, 8 heads, D=128, bf16)",
         lambda: E.write_kv(rnd(8, HK, D), rnd(8, HK, D), rnd(2, 4, BS, HK, D), torch.arange(8))),
        ("sample gumbel (B=4, V=128256)", sample()),
    ]


def gluon_launches(arch: str):
    """(scenario, fn, args, kwargs) of the Gluon kernels (their own launch descriptions)."""
    from halserve.hal.rocm import gluon_kernels

    return gluon_kernels.aot_launches(arch, FP8[arch])


def backend_launches(arch: str) -> dict[str, dict]:
    """Kernel name -> launch kwargs (constexprs and compile options) of RocmBackend's own ops
    (prefill attention, fp8 W8A8 linear at M=256, bf16 MoE) built for ``arch`` on the CPU:
    what its forced configs hand the launchers. Nothing is launched."""
    from halserve.hal.interface import AttentionMetadata, MoeSpec
    from halserve.hal.rocm import RocmBackend

    b = RocmBackend("cpu", arch=arch)
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    B, q_len, ctx, HQ, HK, D, BS = 2, 96, 640, 32, 8, 128, 16
    nblk = ctx // BS
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32) * q_len, seq_lens=torch.full((B,), ctx, dtype=torch.int32),
        block_tables=torch.arange(B * nblk, dtype=torch.int32).view(B, nblk),
        slot_mapping=torch.zeros(B * q_len, dtype=torch.int64), max_seqlen_q=q_len, max_seqlen_k=ctx,
        query_lens_host=[q_len] * B, seq_lens_host=[ctx] * B, block_size=BS)
    w = b.pack_weight(torch.randn(4096, 4096, generator=g).to(bf), "fp8")
    w13 = b.pack_weight(torch.randn(8, 512, 256, generator=g).to(bf), "none")
    w2 = b.pack_weight(torch.randn(8, 256, 256, generator=g).to(bf), "none")
    rec = Recorder()
    with rec.active():
        b.attention(torch.randn(B * q_len, HQ, D, generator=g).to(bf), torch.zeros(2, B * nblk, BS, HK, D, dtype=bf),
                    meta, D ** -0.5)
        b.linear(torch.randn(256, 4096, generator=g).to(bf), w)
        b.moe(torch.randn(300, 256, generator=g).to(bf), torch.randn(300, 8, generator=g), w13, w2, MoeSpec(top_k=2))
    return {fn.__name__: {k: v for k, v in kw.items() if isinstance(v, (int, float, bool, str))}
            for fn, _, kw in rec.calls}


def run(arch: str, log=print) -> list[Compiled]:
    from halserve.hal.triton.configs import forced_arch

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time compiles need JIT kernels")
    out: list[Compiled] = []
    for scen, thunk in scenarios(arch):
        rec = Recorder()
        with forced_arch(arch, hip=True), rec.active():
            thunk()
        seen = set()  # one compile per distinct launch: a kernel launched with other constexprs is another
        for fn, args, kwargs in rec.calls:
            key = (fn.__name__, tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (int, float, bool, str)))))
            if key in seen:
                continue
            seen.add(key)
            t = time.perf_counter()
            c = compile_for(arch, fn, args, kwargs, scen)
            log(f"[{arch}] {scen}: {c.kernel} {'ok' if c.ok else 'FAILED ' + c.error} "
                f"({time.perf_counter() - t:.1f} s) mfma={','.join(c.mfma) or '-'}")
            out.append(c)
    for scen, fn, args, kwargs in gluon_launches(arch):
        t = time.perf_counter()
        c = compile_for(arch, fn, args, kwargs, scen)
        log(f"[{arch}] {scen}: {c.kernel} {'ok' if c.ok else 'FAILED ' + c.error} "
            f"({time.perf_counter() - t:.1f} s) mfma={','.join(c.mfma) or '-'}")
        out.append(c)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(FP8), action="append", required=True)
    ap.add_argument("--json", help="write the per-kernel facts here")
    a = ap.parse_args(argv)
    res = {arch: [asdict(c) for c in run(arch, lambda s: print(s, file=sys.stderr, flush=True))] for arch in a.arch}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    bad = [f"{arch}: {c['kernel']}" for arch, cs in res.items() for c in cs if not c["ok"]]
    print(f"{sum(len(c) for c in res.values()) - len(bad)} kernels compiled, {len(bad)} failed", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
