"""RvvBackend: every HAL op in C through cffi (tensors passed by data_ptr, sizes, strides).

supports() answers exactly what the C kernels handle: float32/bfloat16/float16 tensors on
the CPU, unquantized or int8 weight-only linears and experts. Anything else (fp8 schemes)
is answered "native fallback" there; the op bodies never fall back themselves.
"""
from __future__ import annotations

from typing import Any

import torch

from halserve.hal import cbuild
from halserve.hal.bounds import attention_error, block_pair_error, position_error, slot_error
from halserve.hal.interface import (
    OPS,
    AttentionMetadata,
    MoeSpec,
    PackedWeight,
    ProbeResult,
    SamplingTensors,
)
from halserve.hal.native import NativeBackend
from halserve.hal.riscv_rvv import build

_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
_NAMES = {"float32", "bfloat16", "float16"}


def _dtname(dtype) -> str | None:
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


class RvvBackend(NativeBackend):
    name = "riscv_rvv"

    def __init__(self, device: "str | torch.device | None" = None, batch_invariant: bool = False):
        super().__init__("cpu" if device is None else device, batch_invariant)
        if self.device.type != "cpu":
            raise ValueError(f"riscv_rvv runs on the CPU, not on device {self.device}")
        self.ffi, self.lib = build.load()
        self.lib.hs_set_threads(torch.get_num_threads())
        self.build = build.describe(self.lib.hs_build_info())

    # ---- discovery -------------------------------------------------------------------
    @classmethod
    def probe(cls) -> ProbeResult:
        try:
            riscv, has_v = build.riscv_isa()
            if not riscv:
                import platform

                return ProbeResult(0, f"not riscv64 (this is {platform.machine()}); HALSERVE_BACKEND=riscv_rvv "
                                      "forces the scalar C build", "cpu")
            if not (cbuild._env_lib("riscv_rvv") or cbuild.find_compiler()):
                return ProbeResult(0, "no C compiler to build the kernels (set CC, install gcc, or set "
                                      "HALSERVE_RISCV_RVV_LIB to a prebuilt library)", "cpu")
            if has_v:
                return ProbeResult(50, "riscv64 with the V extension: RVV 1.0 C kernels", "cpu")
            return ProbeResult(20, "riscv64 without V: scalar C kernels", "cpu")
        except Exception as e:  # a probe never raises
            return ProbeResult(0, f"probe failed: {e}", "cpu")

    @classmethod
    def interpreter_ok(cls) -> bool:
        """Forced on any CPU (CI on x86 runs the scalar build) when the library builds."""
        try:
            build.load()
            return True
        except cbuild.CBuildError:
            return False

    def describe(self) -> str:
        return super().describe() + f" build=[{self.build}]"

    def supports(self, op: str, **spec: Any) -> "bool | str":
        if op not in OPS:
            return super().supports(op, **spec)
        dt = _dtname(spec.get("dtype"))
        if dt is not None and dt not in _NAMES:
            return f"native fallback: riscv_rvv kernels take float32, bfloat16 or float16, not {dt}"
        if op in ("linear", "moe"):
            scheme = spec.get("scheme") or "none"
            if spec.get("act_scheme") not in (None, "none"):
                return f"native fallback: riscv_rvv's int8 kernel is weight-only, not {spec['act_scheme']} activations"
            if scheme not in ("none", "int8"):
                return (f"native fallback: riscv_rvv has no {scheme} kernel (RVV 1.0 has no fp8 type); "
                        "unquantized and int8 weight-only run in C")
        kv = _dtname(spec.get("kv_dtype"))
        if op in ("write_kv", "attention") and kv is not None and kv not in _NAMES:
            return f"native fallback: riscv_rvv's KV kernels take a float32, bfloat16 or float16 cache, not {kv}"
        if op == "moe" and (spec.get("num_expert_group") or 1) > 256:
            return "native fallback: riscv_rvv routes at most 256 expert groups"
        refusal = super().supports(op, **spec)
        if isinstance(refusal, str) and refusal.startswith("refused"):
            return refusal
        return True

    # ---- helpers ---------------------------------------------------------------------
    def _p(self, t: "torch.Tensor | None", ctype: str = "void *"):
        return self.ffi.NULL if t is None else self.ffi.cast(ctype, t.data_ptr())

    @staticmethod
    def _code(t: torch.Tensor, what: str) -> int:
        code = _CODE.get(t.dtype)
        if code is None or (code == 3 and what != "weight"):
            raise ValueError(f"riscv_rvv: {what} dtype {t.dtype} is not supported; use float32, bfloat16 or float16")
        return code

    @staticmethod
    def _rows(t: torch.Tensor) -> torch.Tensor:
        """A 2-D view whose rows are contiguous (any row stride), copying only if needed."""
        t2 = t.reshape(-1, t.shape[-1])
        return t2 if t2.stride(-1) == 1 else t2.contiguous()

    @staticmethod
    def _out(out: "torch.Tensor | None", shape, dtype) -> torch.Tensor:
        if out is not None and out.is_contiguous() and out.dtype == dtype and tuple(out.shape) == tuple(shape):
            return out
        return torch.empty(shape, dtype=dtype)

    @staticmethod
    def _check(rc: int, op: str, index_error) -> None:
        """A kernel's status: > 0 an index outside its bound (skipped; ``index_error()`` words
        it), -3 out of memory."""
        if rc > 0:
            raise index_error()
        if rc == -3:
            raise MemoryError(f"riscv_rvv {op}: out of memory for the kernel's row buffers")
        if rc:
            raise RuntimeError(f"riscv_rvv {op}: the C kernel returned {rc}")

    @staticmethod
    def _finish(res: torch.Tensor, out: "torch.Tensor | None") -> torch.Tensor:
        if out is None or out is res:
            return res
        out.copy_(res.view(out.shape) if res.numel() == out.numel() else res)
        return out

    def _weight(self, w: PackedWeight):
        if w.scheme == "none":
            return w.weight.contiguous(), None, 0
        if w.scheme == "int8":
            scale = w.scale.float().contiguous()
            return w.weight.contiguous(), scale, int(scale.numel() > 1)
        raise ValueError(f"riscv_rvv: weight scheme {w.scheme!r} has no C kernel (supports() sends it to "
                         "native); use none or int8")

    # ---- ops -------------------------------------------------------------------------
    def linear(self, x, w, bias=None, out=None):
        x2 = self._rows(x)
        m, k = x2.shape
        weight, scale, per_channel = self._weight(w)
        n = weight.shape[0]
        if weight.shape[-1] != k:
            raise ValueError(f"riscv_rvv linear: x has K={k} but the weight is {tuple(weight.shape)}")
        y = self._out(out if out is None or out.dim() == 2 else None, (m, n), x.dtype)
        b = None if bias is None else bias.to(x.dtype).contiguous()
        self.lib.hs_linear(self._p(x2), self._code(x2, "x"), m, k, x2.stride(0), self._p(weight),
                           self._code(weight, "weight"), n, self._p(scale, "float *"), per_channel,
                           self._p(b), self._p(y), self._code(y, "out"))
        y = y.view(*x.shape[:-1], n)
        return self._finish(y, out)

    def rms_norm(self, x, weight, eps, residual=None, out=None):
        x2 = self._rows(x)
        t, h = x2.shape
        dt = self._code(x2, "x")
        w = weight.to(x.dtype).contiguous()
        y = self._out(out, x.shape, x.dtype)
        hout = None
        r2 = None
        if residual is not None:
            r2 = self._rows(residual.to(x.dtype))
            hout = torch.empty(x.shape, dtype=x.dtype)
        self.lib.hs_rms_norm(self._p(x2), self._p(r2), self._p(w), dt, t, h, x2.stride(0),
                             0 if r2 is None else r2.stride(0), float(eps), self._p(y), self._p(hout))
        y = self._finish(y, out)
        return y if residual is None else (y, hout)

    def rotary(self, positions, q, k, cos_sin_cache, is_neox=True):
        tq, hq, d = q.shape
        hk = k.shape[1]
        if q.stride(2) != 1 or q.stride(1) != d or k.stride(2) != 1 or k.stride(1) != d or q.dtype != k.dtype:
            raise ValueError("riscv_rvv rotary: q and k must be [T, H, D] with contiguous heads and one dtype")
        pos = positions.to(torch.int64).contiguous()
        cache = cos_sin_cache.float().contiguous()
        rot = cache.shape[-1]
        if rot % 2 or rot > d:
            raise ValueError(f"riscv_rvv rotary: rot_dim {rot} must be even and at most head_dim {d}")
        rows = cache.numel() // rot if rot else 0
        rc = self.lib.hs_rotary(self._p(pos, "int64_t *"), self._p(q), self._p(k), self._code(q, "q"), tq, hq, hk, d,
                                q.stride(0), k.stride(0), self._p(cache, "float *"), rot, int(bool(is_neox)), rows)
        self._check(rc, "rotary", lambda: position_error("riscv_rvv rotary", pos, rows))

    def silu_and_mul(self, x, out=None):
        x2 = self._rows(x)
        t, two_i = x2.shape
        y = self._out(out, (*x.shape[:-1], two_i // 2), x.dtype)
        self.lib.hs_silu_and_mul(self._p(x2), self._code(x2, "x"), t, two_i // 2, x2.stride(0), self._p(y))
        return self._finish(y, out)

    def _kv_layout(self, kv_cache: torch.Tensor):
        if not kv_cache.is_contiguous() or kv_cache.shape[0] != 2 or kv_cache.dim() != 5:
            raise ValueError(f"riscv_rvv: kv_cache must be contiguous [2, blocks, block_size, kv_heads, head_dim], "
                             f"got {tuple(kv_cache.shape)}")
        return kv_cache[0].numel()

    def write_kv(self, key, value, kv_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0):
        # the scales apply to fp8 caches only (interface.py); supports() sends those to native
        t = key.shape[0]
        if t == 0:
            return
        half = self._kv_layout(kv_cache)
        hk, d = kv_cache.shape[3], kv_cache.shape[4]
        key = key if key.stride(2) == 1 and key.stride(1) == d else key.contiguous()
        value = value.to(key.dtype)
        value = value if value.stride(2) == 1 and value.stride(1) == d else value.contiguous()
        if key.shape[1:] != kv_cache.shape[3:] or value.shape != key.shape:
            raise ValueError(f"riscv_rvv write_kv: key {tuple(key.shape)} and value {tuple(value.shape)} rows must be "
                             f"the cache's [kv_heads, head_dim] = {tuple(kv_cache.shape[3:])}")
        slots = slot_mapping.to(torch.int64).contiguous()
        nslots = kv_cache.shape[1] * kv_cache.shape[2]
        rc = self.lib.hs_write_kv(self._p(key), self._p(value), self._code(key, "key"), t, hk, d, key.stride(0),
                                  value.stride(0), self._p(kv_cache), self._code(kv_cache, "kv_cache"), half,
                                  self._p(slots, "int64_t *"), nslots)
        self._check(rc, "write_kv", lambda: slot_error("riscv_rvv write_kv", slots, nslots))

    def attention(self, q, kv_cache, meta: AttentionMetadata, scale, out=None, *, k_scale=1.0, v_scale=1.0):
        t, hq, d = q.shape
        half = self._kv_layout(kv_cache)
        hk, bs = kv_cache.shape[3], kv_cache.shape[2]
        if hq % hk:
            raise ValueError(f"riscv_rvv attention: {hq} query heads are not a multiple of {hk} kv heads")
        if q.stride(2) != 1 or q.stride(1) != d:
            q = q.contiguous()
        o = self._out(out, q.shape, q.dtype)
        if o.dim() != 3:
            o = torch.empty(q.shape, dtype=q.dtype)
        cu = meta.cu_seqlens_q.to(torch.int32).contiguous()
        lens = meta.seq_lens.to(torch.int32).contiguous()
        tables = meta.block_tables.to(torch.int32).contiguous()
        nseq = lens.shape[0]
        window = meta.sliding_window or 0
        if bs != meta.block_size or kv_cache.shape[4] != d:
            raise ValueError(f"riscv_rvv attention: the KV cache {tuple(kv_cache.shape)} does not hold blocks of "
                             f"{meta.block_size} tokens (meta.block_size) of head size {d} (q's)")
        if cu.shape[0] <= nseq or tables.dim() != 2 or tables.shape[0] < nseq:  # C reads nseq sequences' entries
            raise ValueError(f"riscv_rvv attention: {nseq} sequences (seq_lens) but cu_seqlens_q has {cu.shape[0]} "
                             f"entries and block_tables is {tuple(tables.shape)}")
        rc = self.lib.hs_attention(self._p(q), self._code(q, "q"), q.stride(0), hq, hk, d, self._p(kv_cache),
                                   self._code(kv_cache, "kv_cache"), half, bs, self._p(cu, "int32_t *"),
                                   self._p(lens, "int32_t *"), self._p(tables, "int32_t *"), tables.shape[-1],
                                   nseq, window, float(scale), self._p(o), self._code(o, "out"), o.stride(0), t,
                                   kv_cache.shape[1])
        self._check(rc, "attention", lambda: attention_error("riscv_rvv attention", rc, cu, lens, tables, bs,
                                                             int(window), kv_cache.shape[1], t))
        return self._finish(o, out)

    def moe(self, x, router_logits, w13, w2, spec: MoeSpec, out=None):
        x2 = x.contiguous()
        t, h = x2.shape
        e = router_logits.shape[-1]
        if spec.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"MoeSpec.scoring {spec.scoring!r} is not valid; use softmax or sigmoid")
        groups = spec.num_expert_group or 1
        if e % groups:
            raise ValueError(f"riscv_rvv moe: {e} experts do not split into {groups} groups")
        a, sa, pc = self._weight(w13)
        b, sb, _ = self._weight(w2)
        if a.dtype != b.dtype:
            raise ValueError("riscv_rvv moe: w13 and w2 must have one dtype")
        # C routes over the router's e columns and indexes the weights by what it picks
        if a.shape[0] != e or b.shape[0] != e:
            raise IndexError(f"riscv_rvv moe: the router has {e} experts but w13 holds {a.shape[0]} and w2 "
                             f"{b.shape[0]}")
        if not 1 <= spec.top_k <= e or groups > 256 or not 1 <= (spec.topk_group or 1) <= groups:
            raise ValueError(f"riscv_rvv moe: top_k {spec.top_k} must be in 1..{e} experts, num_expert_group "
                             f"{groups} at most 256 and topk_group {spec.topk_group} in 1..{groups}")
        inter = a.shape[1] // 2
        logits = router_logits.float().contiguous()
        bias = None if spec.correction_bias is None else spec.correction_bias.float().contiguous()
        y = self._out(out, (t, h), x.dtype)
        self.lib.hs_moe(self._p(x2), self._code(x2, "x"), t, h, self._p(logits, "float *"), e, self._p(a),
                        self._code(a, "weight"), self._p(sa, "float *"), self._p(b), self._p(sb, "float *"),
                        inter, pc, spec.top_k, 0 if spec.scoring == "softmax" else 1, int(spec.renormalize),
                        groups, spec.topk_group or 1, self._p(bias, "float *"), float(spec.routed_scaling_factor),
                        self._p(y))
        return self._finish(y, out)

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, mapping: torch.Tensor) -> None:
        if src.device.type != "cpu" or dst.device.type != "cpu":
            raise ValueError("riscv_rvv: block copies run between CPU tensors only")
        if src.dtype != dst.dtype or src.shape[2:] != dst.shape[2:] or src.shape[0] != 2 or dst.shape[0] != 2 \
                or not (src[0, 0].is_contiguous() and dst[0, 0].is_contiguous()):
            raise ValueError(f"riscv_rvv: block copies need [2, blocks, ...] caches of one dtype with contiguous "
                             f"blocks, got {tuple(src.shape)} {src.dtype} -> {tuple(dst.shape)} {dst.dtype}")
        m = mapping.to(torch.int64).contiguous()
        if m.dim() != 2 or m.shape[1] != 2:
            raise ValueError(f"riscv_rvv: block_mapping must be [n, 2] (source, destination) pairs, got "
                             f"{tuple(mapping.shape)}")
        es = src.element_size()
        rc = self.lib.hs_copy_blocks(self._p(src), self._p(dst), src.stride(0) * es, src.stride(1) * es,
                                     dst.stride(0) * es, dst.stride(1) * es, src[0, 0].numel() * es,
                                     self._p(m, "int64_t *"), m.shape[0], src.shape[1], dst.shape[1])
        self._check(rc, "block copy", lambda: block_pair_error("riscv_rvv block copy", m, src.shape[1], dst.shape[1]))

    def swap_blocks(self, src, dst, block_mapping):
        if block_mapping.numel():
            self._copy(src, dst, block_mapping)

    def copy_blocks(self, kv_caches, block_mapping):
        if block_mapping.numel():
            for cache in kv_caches:
                self._copy(cache, cache, block_mapping)

    def sample(self, logits, params: SamplingTensors, out=None):
        lg = logits.float().contiguous()
        bsz, v = lg.shape
        temp = params.temperature.float().contiguous()
        topk = params.top_k.to(torch.int32).contiguous()
        topp = params.top_p.float().contiguous()
        minp = params.min_p.float().contiguous()
        seeds = params.seeds.to(torch.int64).contiguous()
        steps = params.steps.to(torch.int64).contiguous()
        if params.no_top_k:
            topk = torch.zeros_like(topk)
        if params.no_top_p:
            topp = torch.ones_like(topp)
        if params.no_min_p:
            minp = torch.zeros_like(minp)
        if min(t.numel() for t in (temp, topk, topp, minp, seeds, steps)) < bsz:  # C reads one a row
            raise ValueError(f"riscv_rvv sample: {bsz} rows of logits but shorter sampling tensors")
        y = self._out(out, (bsz,), torch.int64)
        self.lib.hs_sample(self._p(lg, "float *"), bsz, v, self._p(temp, "float *"), self._p(topk, "int32_t *"),
                           self._p(topp, "float *"), self._p(minp, "float *"), self._p(seeds, "int64_t *"),
                           self._p(steps, "int64_t *"), self._p(y, "int64_t *"))
        return self._finish(y, out)


