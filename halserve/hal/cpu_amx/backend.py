"""CpuAmxBackend: HAL ops on x86-64 CPUs through C kernels built per ISA tier.

Which path runs where (``describe()`` says it at start-up):
- linear, M <= SMALL_M (decode) or batch-invariant mode: the C kernels, split over N across
  one OpenMP pool (bf16/fp32 weights as stored; int8 weight-only; int8 W8A8 dynamic with
  exact int32 dots; int4 group-wise).
- linear, bf16 weights, AMX_MIN_M..AMX_MAX_M rows (decode from batch 1 up) on the AMX tier,
  unless batch-invariant: the AMX tile kernel (gemm_amx.c), reading the weight as stored.
- linear, larger M (prefill, big batches): torch's oneDNN GEMM (F.linear), which reaches the
  AMX tiles for bf16 on AMX hosts (check ONEDNN_VERBOSE=1); int8/int4 weights are
  dequantized by a C pass into a kept buffer, a block of rows at a time (quant.linear_tiled).
  W8A8 always runs the integer C kernel.
- attention: sequences with many query rows (prefill) through torch's CPU flash kernel on
  their gathered K/V (prefill.py), unless batch-invariant; the rest in C (split over heads
  and key spans for decode).
- rms_norm (+ residual), rotary, silu_and_mul, write_kv, rotary_write_kv (the two in one
  C call), moe (routing in torch, experts' GEMMs in C): C kernels.
- sample: C (greedy argmax; seeded Gumbel-max under top-k / top-p / min-p, native's noise).
- swap_blocks, copy_blocks: native (torch), said so by ``supports``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from halserve.hal.bounds import attention_error, position_error, slot_error
from halserve.hal.cpu_amx import graph, prefill, quant
from halserve.hal.cpu_amx.tiers import SCORES, choose
from halserve.hal.interface import AttentionMetadata, Capabilities, MoeSpec, PackedWeight, ProbeResult
from halserve.hal.native import NativeBackend, route

SMALL_M = 8  # float weights: above this torch's oneDNN GEMM (AMX where present) wins
SMALL_M_QUANT = 16  # quantized weights: the C kernel until dequantizing per call pays off
# bf16 weights with this many rows on the AMX tier: the tile kernel (gemm_amx.c). From one row: on the
# AMX host (16 threads, 1.1B bf16 batch 1, alternating with the C GEMV, session 11) 54.9 / 50.1 tok/s
# against 47.8 / 46.7; on a 2-vCPU AMX box a tie (docs/performance.md)
AMX_MIN_M, AMX_MAX_M = 1, 128
MOE_SMALL_T = 8  # tokens (x E / (2 top_k) when larger) up to which every pair runs in one C region (moe.c)
_CODES = {torch.float32: 0, torch.bfloat16: 1}
_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_C_SCHEMES = ("none", "int8", "int8_w8a8", *quant.INT4_SCHEMES)


def _ready(t: torch.Tensor, dtype: "torch.dtype | None" = None) -> torch.Tensor:
    """``t`` in ``dtype`` (default: its own) and contiguous, copied only when it is not."""
    if (dtype is None or t.dtype == dtype) and t.is_contiguous():
        return t
    return t.to(dtype or t.dtype).contiguous()


def _dtype(v) -> "torch.dtype | None":
    return _NAMES.get(v) if isinstance(v, str) else v


def sample_args(logits: torch.Tensor, params, out: torch.Tensor) -> tuple[tuple, tuple]:
    """(hs_sample's arguments, the tensors they point into) for ``out`` [B] int64 contiguous."""
    lg = _ready(logits)
    f = (params.all_greedy * 1 | params.all_random * 2 | params.no_top_k * 4 | params.no_top_p * 8
         | params.no_min_p * 16)
    if params.all_greedy:  # the C side reads no per-row parameter: none converted
        return (lg.data_ptr(), int(lg.dtype == torch.bfloat16), lg.shape[0], lg.shape[1], 0, 0, 0, 0, 0, 0, f,
                out.data_ptr()), (lg,)
    keep = (lg, _ready(params.temperature, torch.float32), _ready(params.top_k, torch.int32),
            _ready(params.top_p, torch.float32), _ready(params.min_p, torch.float32),
            _ready(params.seeds, torch.int64), _ready(params.steps, torch.int64))
    if min(t.numel() for t in keep[1:]) < lg.shape[0]:  # C reads one of each per logits row
        raise ValueError(f"cpu_amx sample: {lg.shape[0]} rows of logits but sampling tensors of "
                         f"{[t.numel() for t in keep[1:]]} values")
    return (lg.data_ptr(), int(lg.dtype == torch.bfloat16), lg.shape[0], lg.shape[1],
            *(t.data_ptr() for t in keep[1:]), f, out.data_ptr()), keep


def _rot_dim(cs: torch.Tensor, q: torch.Tensor, op: str) -> int:
    """The cos/sin table's rotary width, which C reads within each head: at most head_dim."""
    rot = cs.shape[-1]
    if rot > q.shape[-1] or rot % 2 or rot == 0:
        raise ValueError(f"cpu_amx {op}: the cos/sin cache's width {rot} must be even, nonzero and at most the "
                         f"head size {q.shape[-1]}")
    return rot


def _failed(op: str, rc: int, shape: str):
    """A C kernel's error code as one line naming the op (-3: a scratch malloc failed)."""
    if rc == -3:
        raise MemoryError(f"cpu_amx {op} ({shape}): out of memory for the kernel's scratch")
    raise RuntimeError(f"cpu_amx {op} ({shape}): the C kernel returned {rc}")


class CpuAmxBackend(NativeBackend):
    name = "cpu_amx"

    def __init__(self, device: "str | torch.device | None" = None, batch_invariant: bool = False):
        super().__init__("cpu", batch_invariant)
        tier = choose()
        if tier.name is None:
            raise RuntimeError(tier.reason)
        self.tier, self.ffi, self.lib = tier.name, tier.ffi, tier.lib
        # one pool the size of torch's: the two never run at once, so no oversubscription
        self.threads = torch.get_num_threads()
        self.lib.hs_set_threads(self.threads)
        # batched decode on AMX tiles; False: the pre-AMX paths (the perf tool's before/after)
        self.amx_gemm = self.tier == "amx"
        self.graphs_on = graph.enabled()  # decode steps captured and replayed by graph.py
        self.graph_refusal: "str | None" = None  # why the last capture_graph returned None

    @classmethod
    def probe(cls) -> ProbeResult:
        try:
            tier = choose()
        except Exception as e:  # never raise from a probe
            return ProbeResult(0, f"cpu_amx probe failed: {type(e).__name__}: {e}")
        if tier.name is None:
            return ProbeResult(0, tier.reason)
        return ProbeResult(SCORES[tier.name], tier.reason, "cpu")

    @property
    def capabilities(self) -> Capabilities:
        base = super().capabilities
        return Capabilities(quant_schemes=(*base.quant_schemes, "int8_w8a8", *quant.INT4_SCHEMES),
                            fp8_formats=base.fp8_formats, batch_invariant=True,
                            graphs=getattr(self, "graphs_on", False))

    def capture_graph(self, fn, *args):
        """A decode step replayed by graph.py (C kernel runs in one C call each), or None
        where the step reads host values a replay would not see (``graph_refusal`` says which)."""
        return graph.capture(self, fn, args) if self.graphs_on else None

    def describe(self) -> str:
        return (f"{super().describe()} tier={self.tier} threads={self.threads} "
                f"linear=C(M<={SMALL_M}{', every M' if self.batch_invariant else ''})"
                f"{'' if self.batch_invariant else '+oneDNN(larger M)'}"
                f"{f'+AMX tiles(bf16 W, M {AMX_MIN_M}..{AMX_MAX_M})' if self.amx_gemm and not self.batch_invariant else ''}")

    # ---- dispatch -------------------------------------------------------------------------
    def supports(self, op: str, **spec: Any) -> "bool | str":
        base = NativeBackend.supports(self, op, **spec) if op != "linear" else True
        if isinstance(base, str) and base.startswith("refused"):
            return base
        dt = _dtype(spec.get("dtype"))
        if op == "sample":
            if dt is not None and dt not in _CODES:
                return f"native fallback: cpu_amx's sampler reads float32 or bfloat16 logits, not {dt}"
            return True
        if dt is not None and dt not in _CODES and op in ("linear", "moe") and spec.get("scheme") == "int4":
            # native cannot read cpu_amx's own int4 layout: no fallback exists
            return f"refused: cpu_amx's int4 weights take float32 or bfloat16 activations, not {dt}"
        if dt is not None and dt not in _CODES and op not in ("swap_blocks", "copy_blocks"):
            return f"native fallback: cpu_amx kernels take float32 and bfloat16, not {dt}"
        if op == "linear":
            scheme = spec.get("scheme") or "none"
            if scheme not in _C_SCHEMES:
                if scheme in quant.NATIVE_ONLY:
                    return f"native fallback: {scheme} weights run as dequantize then GEMM in torch"
                return f"refused: quant scheme {scheme!r} is not valid; use {', '.join(_C_SCHEMES)}"
            act = spec.get("act_scheme") or "none"
            if scheme == "int8" and act not in ("none", "per_token"):
                return f"native fallback: int8 with {act} activations runs in torch (the C kernel quantizes per token)"
            return True
        kv = _dtype(spec.get("kv_dtype"))
        if op in ("write_kv", "attention") and kv is not None and kv not in _CODES:
            return f"native fallback: cpu_amx's KV kernels take a float32 or bfloat16 cache, not {kv}"
        if op in ("rms_norm", "silu_and_mul", "write_kv"):
            return True
        if op == "rotary":
            d = spec.get("head_dim") or 0
            return True if d <= 1024 else "native fallback: head_dim > 1024"
        if op == "rotary_write_kv":
            if kv is not None and kv != dt:
                return f"native fallback: the fused kernel copies k into a cache of k's dtype, not {kv}"
            d = spec.get("head_dim") or 0
            return True if d <= 1024 else "native fallback: head_dim > 1024"
        if op == "attention":
            hq, hk = spec.get("num_heads"), spec.get("num_kv_heads")
            if hq and hk and hq // hk > 64:
                return "native fallback: more than 64 query heads per kv head"
            d = spec.get("head_dim") or 0
            return True if d <= 1024 else "native fallback: head_dim > 1024"
        if op == "moe":
            scheme = spec.get("scheme") or "none"
            if scheme not in ("none", "int8", "int4"):
                return f"native fallback: {scheme} experts run in torch"
            return True
        return f"native fallback: {op} runs in torch (not a bottleneck on a CPU)"

    @staticmethod
    def _ptr(t: "torch.Tensor | None", ctype: str = "") -> int:
        """The address C reads (the library takes pointers as integers: see lib.CDEF)."""
        return 0 if t is None else t.data_ptr()

    # ---- weights --------------------------------------------------------------------------
    def pack_weight(self, weight: torch.Tensor, scheme: str = "none", *,
                    act_scheme: str | None = None) -> PackedWeight:
        """Adds 'int8_w8a8' (per-channel int8 weight, per-token dynamic int8 activations) and
        'int4' / 'int4_g32' / 'int4_g64' / 'int4_g128' (group-wise, fp32 scales)."""
        if scheme == "int8_w8a8":
            pw = super().pack_weight(weight, "int8", act_scheme="per_token")
            pw.extra["c_scheme"] = "w8a8"
            pw.weight = quant.on_huge_pages(pw.weight.contiguous())  # the GEMVs stream it: 2 MiB pages
            return pw
        if scheme in quant.INT4_SCHEMES:
            group = quant.INT4_SCHEMES[scheme]
            if scheme == "int4":  # the default: 128, or the largest of 64 / 32 dividing K
                group = next((g for g in (128, 64, 32) if weight.shape[-1] % g == 0), 128)
            pw = quant.pack_int4(weight, group)
            # 2-D (a linear's): the decode GEMV's 16-row layout; stacked experts stay row-major
            if weight.dim() == 2 and quant.INT4_INTERLEAVE:
                return quant.interleave_int4(pw)
            pw.weight = quant.on_huge_pages(pw.weight)
            return pw
        pw = super().pack_weight(weight, scheme, act_scheme=act_scheme)
        if pw.scheme == "none" or pw.scheme == "int8":
            pw.weight = pw.weight.contiguous()
        if pw.scheme == "int8":
            pw.weight = quant.on_huge_pages(pw.weight)
        return pw

    # ---- ops ------------------------------------------------------------------------------
    def _plan(self, w: PackedWeight) -> tuple:
        """(weight tensor, kind, weight ptr, scale ptr, group, tensors held, row-sum ptr),
        made once per weight and kept in ``w.extra``: a decode token calls linear ~100 times
        and the answer never changes while ``w.weight`` is the same tensor. int8 weights
        also get their row sums over the first K & ~63 values (int32), which the byte-dot
        kernels would otherwise recompute every call."""
        plan = w.extra.get("cpu_amx_plan")
        if plan is not None and plan[0] is w.weight:
            return plan
        wt, scale, group = w.weight, None, 0
        if w.scheme == "none":
            if wt.dtype not in _CODES:
                wt = w.extra.setdefault("f32", wt.float().contiguous())
            kind = _CODES[wt.dtype]
        elif w.scheme == "int8":
            kind, scale = (2 if w.act_scheme == "none" else 4), w.scale.float().contiguous()
        else:  # int4 (the dispatcher sends every other scheme to native)
            kind = 5 if w.extra.get("layout") == "x16" else 3  # 5: linear_q.c's 16-row layout
            scale, group = w.scale.float().contiguous(), w.extra["group"]
        wt = wt.contiguous()
        wsum = None
        if kind in (2, 4):
            kv = wt.shape[-1] & ~63
            wsum = wt[:, :kv].sum(-1, dtype=torch.int32).contiguous()
        plan = (w.weight, kind, wt.data_ptr(), self._ptr(scale), group, (wt, scale, wsum), self._ptr(wsum))
        w.extra["cpu_amx_plan"] = plan
        return plan

    def linear(self, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        _, kind, wp, sp, group, _, ws = self._plan(w)
        m, k = x.shape
        n = w.out_features
        if self._takes_amx(kind, m):
            return self._linear_amx(x, w, wp, bias, out)
        small = SMALL_M if w.scheme == "none" else SMALL_M_QUANT
        if m > small and not self.batch_invariant and kind != 4:
            y = (F.linear(x, w.weight.to(x.dtype), bias) if w.scheme == "none"
                 else quant.linear_tiled(self.lib, x.contiguous(), w, kind, wp, sp, group, bias))
            return y if out is None else out.copy_(y)
        xc = x if x.is_contiguous() else x.contiguous()
        bf = None if bias is None else bias.float().contiguous()
        direct = out is not None and out.dtype == x.dtype and out.is_contiguous()
        y = out if direct else torch.empty(m, n, dtype=x.dtype)
        xs = torch.empty(m) if kind == 4 else None
        bf16 = int(x.dtype == torch.bfloat16)
        rc = self.lib.hs_linear(xc.data_ptr(), bf16, m, k, wp, kind, sp, group, n, self._ptr(bf), y.data_ptr(),
                                bf16, self._ptr(xs), ws)
        if rc:
            _failed("linear", rc, f"M={m} K={k} N={n}")
        return y if out is None or direct else out.copy_(y)

    def _takes_amx(self, kind: int, m: int) -> bool:
        """Whether ``linear`` runs ``m`` rows on this weight kind through the AMX tile kernel."""
        return (kind == 1 and AMX_MIN_M <= m <= AMX_MAX_M and self.amx_gemm and self.tier == "amx"
                and not self.batch_invariant)

    def _linear_amx(self, x, w, wp, bias, out):
        """bf16 weights, AMX_MIN_M..AMX_MAX_M rows (decode, batch 1 up): the AMX tile kernel (gemm_amx.c),
        which reads the weight as stored, once for all rows."""
        xc = x if x.is_contiguous() else x.contiguous()
        m, k = xc.shape
        bf = None if bias is None else _ready(bias, torch.float32)
        direct = out is not None and out.dtype == x.dtype and out.is_contiguous()
        y = out if direct else torch.empty(m, w.out_features, dtype=x.dtype)
        bf16 = int(x.dtype == torch.bfloat16)
        rc = self.lib.hs_gemm_amx(xc.data_ptr(), bf16, m, k, wp, w.out_features, self._ptr(bf), y.data_ptr(), bf16)
        if rc:  # (other codes: this build has no AMX, or M outside 1..128; supports() keeps both out)
            _failed("AMX GEMM", rc, f"M={m} K={k} N={w.out_features}")
        return y if out is None or direct else out.copy_(y)

    def linear_call(self, x: torch.Tensor, w: PackedWeight):
        """A closure that runs the C kernel ``linear`` picks for this weight and ``x`` (the AMX tile
        kernel or the GEMV) with every pointer made once (the perf tool times the kernel alone with
        it: no dispatch, no Python conversions)."""
        _, kind, wp, sp, group, _, ws = self._plan(w)
        m, k = x.shape
        y = torch.empty(m, w.out_features, dtype=x.dtype)
        xs = torch.empty(m)
        bf16 = int(x.dtype == torch.bfloat16)
        if self._takes_amx(kind, m):
            args = (x.data_ptr(), bf16, m, k, wp, w.out_features, 0, y.data_ptr(), bf16)
            fn = self.lib.hs_gemm_amx
        else:
            args = (x.data_ptr(), bf16, m, k, wp, kind, sp, group, w.out_features, 0, y.data_ptr(), bf16,
                    xs.data_ptr(), ws)
            fn = self.lib.hs_linear
        keep = (x, y, xs, w)

        def call():
            return fn(*args), keep

        call.y = y  # where each call writes
        return call

    # The small ops run ~10 times a layer at batch 1, where each torch call in their Python
    # (a .to() or .contiguous() that returns its input still goes through the dispatcher)
    # costs as much as the kernel: inputs are checked with attribute reads and converted
    # only when they must be; the K/V halves of a cache are addressed by pointer arithmetic.

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None):
        xc = _ready(x)
        hsz = xc.shape[-1]
        t = xc.numel() // hsz
        dst = out if out is not None and out.is_contiguous() else torch.empty_like(xc)
        h = None if residual is None else torch.empty_like(xc)
        res = None if residual is None else _ready(residual, x.dtype)
        # C reads a float32 or bfloat16 weight as it is (no conversion per call)
        wc = weight if weight.dtype in _CODES and weight.is_contiguous() else weight.float().contiguous()
        self.lib.hs_rms_norm(xc.data_ptr(), 0 if res is None else res.data_ptr(), wc.data_ptr(), _CODES[wc.dtype],
                             dst.data_ptr(), 0 if h is None else h.data_ptr(), t, hsz, float(eps), _CODES[x.dtype])
        if out is not None and dst is not out:
            out.copy_(dst)
            dst = out
        return dst if residual is None else (dst, h)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
        if not (q.is_contiguous() and k.is_contiguous()) or q.dtype != k.dtype:
            qc, kc = q.contiguous(), k.to(q.dtype).contiguous()
            self.rotary(positions, qc, kc, cos_sin_cache, is_neox)
            q.copy_(qc)
            k.copy_(kc)
            return None
        pos = _ready(positions, torch.int64)
        cs = _ready(cos_sin_cache, torch.float32)
        rot = _rot_dim(cs, q, "rotary")
        rows = cs.numel() // rot
        if self.lib.hs_rotary(pos.data_ptr(), q.data_ptr(), k.data_ptr(), cs.data_ptr(), q.shape[0], q.shape[1],
                              k.shape[1], q.shape[2], rot, int(bool(is_neox)), _CODES[q.dtype], rows):
            raise position_error("cpu_amx rotary", pos, rows)

    def silu_and_mul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        xc = _ready(x)
        i = xc.shape[-1] // 2
        t = xc.numel() // xc.shape[-1]
        dst = out if out is not None and out.is_contiguous() else torch.empty(*xc.shape[:-1], i, dtype=x.dtype)
        self.lib.hs_silu_and_mul(xc.data_ptr(), dst.data_ptr(), t, i, _CODES[x.dtype])
        if out is not None and dst is not out:
            return out.copy_(dst)
        return dst

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        # k_scale / v_scale apply to fp8 caches only (interface.py), and supports() sends those to native
        if not kv_cache.is_contiguous():  # the engine's caches are; a view is written through a copy
            tmp = kv_cache.contiguous()
            self.write_kv(key, value, tmp, slot_mapping)
            kv_cache.copy_(tmp)
            return None
        if slot_mapping.numel() == 0:
            return
        k = _ready(key, kv_cache.dtype)
        v = _ready(value, kv_cache.dtype)
        slots = _ready(slot_mapping, torch.int64)
        row = k.shape[1] * k.shape[2] * k.element_size()
        base, half = kv_cache.data_ptr(), kv_cache.stride(0) * kv_cache.element_size()
        nslots = half // row  # whole rows in one half of the cache: C writes no byte past it
        if self.lib.hs_write_kv(k.data_ptr(), v.data_ptr(), base, base + half, slots.data_ptr(), k.shape[0], row,
                                nslots):
            raise slot_error("cpu_amx write_kv", slots, nslots)

    def rotary_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_sin_cache: torch.Tensor, is_neox: bool, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0,
                        q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                        norm_eps: float = 1e-6) -> None:
        if k.dtype != q.dtype:  # supports() saw q's dtype only; the engine's q, k, v share one
            raise ValueError(f"rotary_write_kv: k is {k.dtype} and q {q.dtype}; cpu_amx takes one dtype for both")
        if (q_norm_weight is None) != (k_norm_weight is None):
            raise ValueError("rotary_write_kv: pass q_norm_weight and k_norm_weight together, or neither")
        for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            if w is not None and w.numel() != q.shape[-1]:  # C reads head_dim values of each
                raise ValueError(f"rotary_write_kv: {name} has {w.numel()} values; the head size is {q.shape[-1]}")
        norm = dict(q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps)
        if not (q.is_contiguous() and k.is_contiguous() and kv_cache.is_contiguous()):
            # the engine's tensors are; other views go through contiguous copies, as in rotary
            qc, kc, cc = q.contiguous(), k.contiguous(), kv_cache.contiguous()
            self.rotary_write_kv(positions, qc, kc, v, cos_sin_cache, is_neox, cc, slot_mapping, **norm)
            for dst, src in ((q, qc), (k, kc), (kv_cache, cc)):
                if dst is not src:
                    dst.copy_(src)
            return None
        pos = _ready(positions, torch.int64)
        cs = _ready(cos_sin_cache, torch.float32)
        vc = _ready(v, kv_cache.dtype)
        slots = _ready(slot_mapping, torch.int64)
        base, half = kv_cache.data_ptr(), kv_cache.stride(0) * kv_cache.element_size()
        qw = kw = None
        if q_norm_weight is not None:  # C reads one float32 or bfloat16 dtype for both, as stored
            qw, kw = (w if w.dtype in _CODES and w.is_contiguous() else w.float().contiguous()
                      for w in (q_norm_weight, k_norm_weight))
            if qw.dtype != kw.dtype:
                qw, kw = qw.float(), kw.float()
        rot = _rot_dim(cs, q, "rotary_write_kv")
        rows, nslots = cs.numel() // rot, half // (k.shape[1] * k.shape[2] * k.element_size())
        if self.lib.hs_rotary_write_kv(pos.data_ptr(), q.data_ptr(), k.data_ptr(), vc.data_ptr(), cs.data_ptr(), base,
                                       base + half, slots.data_ptr(), q.shape[0], q.shape[1], k.shape[1], q.shape[2],
                                       rot, int(bool(is_neox)), _CODES[q.dtype], self._ptr(qw), self._ptr(kw),
                                       _CODES[qw.dtype] if qw is not None else 0, float(norm_eps), rows, nslots):
            if bool(((pos < 0) | (pos >= rows)).any()):
                raise position_error("cpu_amx rotary_write_kv", pos, rows)
            raise slot_error("cpu_amx rotary_write_kv", slots, nslots)

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, out: torch.Tensor | None = None, *, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> torch.Tensor:
        kv_cache = _ready(kv_cache)
        qc = _ready(q)
        dst = out if out is not None and out.is_contiguous() else torch.empty_like(qc)
        if not self.batch_invariant and kv_cache.dtype == qc.dtype and prefill.long_seqs(meta):
            prefill.attention(self, qc, kv_cache, meta, scale, dst)  # torch's flash kernel for long prompts
            return dst if out is None or dst is out else out.copy_(dst)
        cu = _ready(meta.cu_seqlens_q, torch.int32)
        sl = _ready(meta.seq_lens, torch.int32)
        bt = _ready(meta.block_tables, torch.int32)
        t, hq, d = qc.shape
        n = meta.num_seqs
        if kv_cache.shape[2] != meta.block_size or kv_cache.shape[-1] != d:  # C indexes the cache by them
            raise ValueError(f"cpu_amx attention: the KV cache {tuple(kv_cache.shape)} does not hold blocks of "
                             f"{meta.block_size} tokens (meta.block_size) of head size {d} (q's)")
        if cu.shape[0] <= n or sl.shape[0] < n or bt.shape[0] < n:  # C reads n sequences' entries
            raise ValueError(f"cpu_amx attention: {n} sequences (seq_lens_host) but cu_seqlens_q has "
                             f"{cu.shape[0]} entries, seq_lens {sl.shape[0]}, block_tables {bt.shape[0]} rows")
        base, half = kv_cache.data_ptr(), kv_cache.stride(0) * kv_cache.element_size()
        rc = self.lib.hs_attention(qc.data_ptr(), base, base + half, dst.data_ptr(), cu.data_ptr(), sl.data_ptr(),
                                   bt.data_ptr(), bt.shape[1], n, t, hq, kv_cache.shape[-2], d,
                                   meta.block_size, int(meta.sliding_window or 0), float(scale), _CODES[q.dtype],
                                   int(max(meta.seq_lens_host, default=0)), _CODES[kv_cache.dtype],
                                   # prefill rows through the decode rows' key spans in
                                   # batch-invariant mode: a token's bits never depend on its chunking
                                   int(self.batch_invariant), kv_cache.shape[1])
        if rc > 0:
            raise attention_error("cpu_amx attention", rc, cu, sl, bt, meta.block_size, int(meta.sliding_window or 0),
                                  kv_cache.shape[1], t)
        if rc:
            _failed("attention", rc, f"{t} query rows, {meta.num_seqs} sequences, up to "
                    f"{max(meta.seq_lens_host, default=0)} keys")
        if out is not None and dst is not out:
            out.copy_(dst)
            return out
        return dst

    def sample(self, logits: torch.Tensor, params, out: torch.Tensor | None = None) -> torch.Tensor:
        direct = out is not None and out.dtype == torch.int64 and out.is_contiguous()
        y = out if direct else torch.empty(logits.shape[0], dtype=torch.int64)
        args, _keep = sample_args(logits, params, y)
        rc = self.lib.hs_sample(*args)
        if rc:
            _failed("sample", rc, f"{logits.shape[0]} rows of {logits.shape[-1]} logits")
        return y if out is None or direct else out.copy_(y)

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, w13: PackedWeight,
            w2: PackedWeight, spec: MoeSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        topk_w, topk_ids = route(router_logits, spec)
        kind = self._moe_kind(w13, w2, x.dtype)
        # the fused kernel reads each routed expert once per 4 of its tokens: it wins while
        # experts see few tokens each (about 4 on average at this limit; Qwen3-30B-A3B: 64)
        limit = MOE_SMALL_T * max(1, w13.weight.shape[0] // (2 * spec.top_k))
        if kind is not None and (x.shape[0] <= limit or self.batch_invariant):
            return self._moe_small(x, topk_w, topk_ids, w13, w2, kind, out)
        # prefill: the pairs sorted by expert, each expert's rows one GEMM on a view of them
        t, k, hdim = x.shape[0], spec.top_k, w2.weight.shape[-2]
        flat = topk_ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=w13.weight.shape[0]).tolist()
        xs = x.index_select(0, order // k)
        ys = torch.empty(t * k, hdim, dtype=x.dtype)
        start = 0
        for e, c in enumerate(counts):
            if c:
                h = self.silu_and_mul(self.linear(xs[start:start + c], self._expert(w13, e), None))
                ys[start:start + c] = self.linear(h, self._expert(w2, e), None)
                start += c
        y = torch.empty_like(ys)
        y[order] = ys
        acc = (y.view(t, k, hdim).float() * topk_w.float().unsqueeze(-1)).sum(1)
        return acc.to(x.dtype) if out is None else out.copy_(acc)

    @staticmethod
    def _expert(w: PackedWeight, e: int) -> PackedWeight:
        """Expert e of a stacked weight, made once and kept in ``w.extra``, so its linear plan
        (int8 row sums: a pass over the expert) is made once, not every prefill call."""
        cache = w.extra.get("cpu_amx_experts")
        if cache is None or cache[0] is not w.weight:
            cache = w.extra["cpu_amx_experts"] = (w.weight, {})
        pw = cache[1].get(e)
        if pw is None:
            pw = cache[1][e] = quant.expert(w, e)
        return pw

    def _moe_kind(self, w13: PackedWeight, w2: PackedWeight, dtype: torch.dtype) -> "int | None":
        """The fused small-batch MoE kernel's weight code, or None when the per-expert path runs."""
        if w13.scheme != w2.scheme or w13.act_scheme != "none":
            return None
        if w13.scheme == "int8":
            return 2 if w13.scale.dim() == 2 and w2.scale.dim() == 2 else None
        if w13.scheme == "none" and w13.weight.dtype == w2.weight.dtype == dtype:
            return _CODES[dtype]
        return None

    def _moe_small(self, x, topk_w, topk_ids, w13, w2, kind, out):
        """Every (token, expert) pair in one C region (moe.c), ``out`` written in x's dtype.
        Pointers to the stacked weights and their scales are made once per weight."""
        t, hdim = x.shape
        xc = _ready(x)
        ids = _ready(topk_ids, torch.int64)
        tw = _ready(topk_w, torch.float32)
        direct = out is not None and out.dtype == x.dtype and out.is_contiguous()
        y = out if direct else torch.empty(t, hdim, dtype=x.dtype)
        (w13p, s13p, ws13p), (w2p, s2p, ws2p) = self._moe_plan(w13), self._moe_plan(w2)
        rc = self.lib.hs_moe(xc.data_ptr(), int(x.dtype == torch.bfloat16), t, hdim, w2.weight.shape[-1],
                             w13.weight.shape[0], ids.shape[1], ids.data_ptr(), tw.data_ptr(), w13p, s13p, ws13p, w2p,
                             s2p, ws2p, kind, y.data_ptr())
        if rc == -2:  # the ids come from route() over the router's width: a router wider than the weights
            e = w13.weight.shape[0]
            bad = ids[(ids < 0) | (ids >= e)]
            raise IndexError(f"cpu_amx moe: expert id {int(bad[0]) if bad.numel() else '?'} is outside the "
                             f"{e} experts of the weights (valid 0..{e - 1}): the router logits are wider than w13")
        if rc:
            _failed("moe", rc, f"{t} tokens, {w13.weight.shape[0]} experts")
        return y if out is None or direct else out.copy_(y)

    @staticmethod
    def _moe_plan(w: PackedWeight) -> tuple[int, int, int]:
        """(weight ptr, per-row scale ptr or 0, int8 row sums ptr or 0) of a stacked expert
        weight, kept in ``w.extra``; the row sums (over the first K & ~63 values) are what
        the byte-dot kernel would otherwise recompute every call."""
        plan = w.extra.get("cpu_amx_moe")
        if plan is None or plan[0] is not w.weight:
            wt = w.weight.contiguous()
            sc = ws = None
            if w.scheme == "int8":
                sc = w.scale.float().contiguous()
                ws = wt[..., :wt.shape[-1] & ~63].sum(-1, dtype=torch.int32).contiguous()
            ptrs = tuple(0 if v is None else v.data_ptr() for v in (wt, sc, ws))
            plan = (w.weight, wt, sc, ws, ptrs)
            w.extra["cpu_amx_moe"] = plan
        return plan[4]
