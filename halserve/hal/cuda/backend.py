"""CudaBackend: NVIDIA GPUs through Triton kernels (``halserve.hal.triton``) and torch
(cuBLAS for bf16 GEMMs, cuBLASLt ``_scaled_mm`` for FP8), with CUDA graphs for decode.

Features are gated by compute capability: FP8 W8A8 on sm_89+, NVFP4 refused below sm_100.
Batch-invariant mode swaps cuBLAS for the persistent fixed-tile Triton matmul and runs decode
rows on the decode attention tile with key splits fixed by each sequence's own length
(``halserve.hal.triton.attention``).

Under ``TRITON_INTERPRET=1`` the backend runs on the CPU (``interpreter_ok()``), so the
Triton kernels can be checked by the conformance suite without a GPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

from halserve.hal.interface import AttentionMetadata, Capabilities, MoeSpec, PackedWeight, ProbeResult, SamplingTensors
from halserve.hal.kv_fp8 import is_fp8
from halserve.hal.native import NativeBackend
from halserve.hal.quant import WEIGHT_SCHEMES
from halserve.hal.routing import route
from halserve.hal.sampling import sampling_mask

logger = logging.getLogger("halserve")

_FP4_SCHEMES = ("nvfp4", "fp4", "mxfp4")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CudaGraph:
    """A captured decode step: ``replay()`` reruns it on the same static input tensors and
    returns the same static output object (copy new inputs into the captured tensors first)."""

    __slots__ = ("graph", "output")

    def __init__(self, graph: "torch.cuda.CUDAGraph", output: Any):
        self.graph = graph
        self.output = output

    def replay(self) -> Any:
        self.graph.replay()
        return self.output

    __call__ = replay


class CudaBackend(NativeBackend):
    name = "cuda"

    def __init__(self, device: "str | torch.device | None" = None, batch_invariant: bool = False):
        if device is None:
            device = "cpu" if _interpreting() and not torch.cuda.is_available() else "cuda"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(device, batch_invariant)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            self.capability: tuple[int, int] = torch.cuda.get_device_capability(device)
            self.device_name = torch.cuda.get_device_name(device)
        else:  # the Triton interpreter on the CPU: behave like an sm_90 part
            self.capability = (9, 0)
            self.device_name = "triton-interpreter (cpu)"
        self._graph_pool = None
        self._copy_streams: dict[int, torch.cuda.Stream] = {}
        self._graph_mode = False  # True while warming up / capturing a graph
        self._fp8_choice: dict[tuple, str] = {}

    # ---- discovery ------------------------------------------------------------------------
    @classmethod
    def probe(cls) -> ProbeResult:
        try:
            if not torch.cuda.is_available():
                return ProbeResult(0, "no CUDA device visible to torch", "cpu")
            if getattr(torch.version, "hip", None):
                return ProbeResult(0, "torch is a ROCm build: use the rocm backend", "cpu")
            if importlib.util.find_spec("triton") is None:
                return ProbeResult(0, "triton is not installed (pip install triton)", "cpu")
            idx = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            cap = f"sm_{props.major}{props.minor}"
            if props.major < 8:
                return ProbeResult(0, f"{props.name} is {cap}; the Triton kernels need sm_80+", f"cuda:{idx}")
            gib = props.total_memory / 2**30
            return ProbeResult(100, f"{props.name}, {cap}, {gib:.0f} GiB", f"cuda:{idx}")
        except Exception as e:  # probe never raises
            return ProbeResult(0, f"CUDA probe failed: {e}", "cpu")

    @classmethod
    def interpreter_ok(cls) -> bool:
        """True when TRITON_INTERPRET=1 and triton is importable: the kernels then run on the CPU."""
        return _interpreting() and importlib.util.find_spec("triton") is not None

    @property
    def capabilities(self) -> Capabilities:
        fp8 = self.capability >= (8, 9)
        return Capabilities(
            quant_schemes=("none", "int8", "fp8") if fp8 else ("none", "int8"),
            fp8_formats=("e4m3",) if fp8 else (),
            fp4_formats=(),  # NVFP4 kernels: not yet (and never below sm_100)
            graphs=self.device.type == "cuda",
            batch_invariant=True,
            pin_memory=self.device.type == "cuda",
        )

    def supports(self, op: str, **spec: Any) -> "bool | str":
        sm = f"sm_{self.capability[0]}{self.capability[1]}"
        scheme = spec.get("scheme")
        if scheme in _FP4_SCHEMES:
            if self.capability < (10, 0):
                return f"refused: NVFP4 needs compute capability 10.0+ (Blackwell); this GPU is {sm}"
            return "refused: NVFP4 kernels are not implemented yet"
        if scheme is not None and scheme.startswith("fp8") and self.capability < (8, 9):
            return f"refused: FP8 needs compute capability 8.9+ (Ada/Hopper); this GPU is {sm}"
        r = super().supports(op, **spec)
        if r is not True:
            return r
        stored = {WEIGHT_SCHEMES.get(s, (s,))[0] for s in (scheme, spec.get("w2_scheme")) if s is not None}
        if op == "linear" and not stored <= {"none", "fp8"}:
            return f"native fallback: {scheme} runs as dequantize then GEMM"
        if op == "moe" and not stored <= {"none", "fp8"}:
            return f"native fallback: the fused MoE kernel takes none/fp8 weights, not {scheme}/{spec.get('w2_scheme')}"
        if op == "rotary" and spec.get("unit_stride") is False:
            return "native fallback: the rotary kernel needs q and k with a unit-stride head dim"
        # write_kv builds e4m3 bytes in integer ops (any GPU); attention needs Triton's e4m3 upcast
        if op == "attention" and is_fp8(spec.get("kv_dtype")) and self.capability < (8, 9):
            return f"native fallback: Triton converts e4m3 on sm_89+ only; this GPU is {sm}"
        if op == "write_kv" and (spec.get("unit_stride") is False or spec.get("contiguous") is False):
            return "native fallback: the write_kv kernel needs a contiguous cache and unit-stride k, v"
        if op == "rotary_write_kv" and (spec.get("unit_stride") is False or spec.get("cache_contiguous") is False):
            return "native fallback: the fused kernel needs a contiguous cache and unit-stride q, k, v"
        return True

    def describe(self) -> str:
        kernels = "cuBLAS bf16 GEMM" if not self.batch_invariant else "persistent Triton GEMM (batch-invariant)"
        return (f"{super().describe()} gpu={self.device_name} sm_{self.capability[0]}{self.capability[1]} "
                f"gemm={kernels} fp8={'_scaled_mm|triton' if self.capability >= (8, 9) else 'off'}")

    # ---- memory ---------------------------------------------------------------------------
    def default_kv_cache_bytes(self, gpu_memory_utilization: float, profile=None) -> int:
        if self.device.type != "cuda":
            return super().default_kv_cache_bytes(gpu_memory_utilization, profile)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        if profile is not None:
            profile()
            torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free  # weights, CUDA context, other processes
        budget = int(total * gpu_memory_utilization) - used - activation_peak - (256 << 20)
        return max(budget, 1 << 20)

    # ---- graphs ---------------------------------------------------------------------------
    def capture_graph(self, fn, *args):
        """Capture ``fn(*args)`` into a CUDA graph; returns a ``CudaGraph`` (``replay()`` gives
        the captured output) or None on the CPU. Kernels pick graph-safe configs (split count
        from the batch shape, no fp8 timing) while this runs."""
        if self.device.type != "cuda":
            return None
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        self._graph_mode = True
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compile and autotune outside the capture
                    fn(*args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                output = fn(*args)
        finally:
            self._graph_mode = False
        return CudaGraph(graph, output)

    def copy_stream(self, lane: int = 0):
        """Block copies on a CUDA stream of their own (one per lane), ordered after the work
        queued so far on the current stream."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        s = self._copy_streams.get(lane)
        if s is None:
            s = self._copy_streams[lane] = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(s)

    def event(self):
        if self.device.type != "cuda":
            return None
        # external: a wait captured in a graph waits on the event's record made outside it
        ev = torch.cuda.Event(external=True)
        ev.record()  # created now (torch makes events lazily, and a capture skips a wait on none)
        return ev

    # ---- ops ------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if w.scheme == "none":
            if self.batch_invariant:
                # one fixed-tile kernel for every M, split-K fixed by the weight's shape and
                # partials added in split order: batch 1 fills the chip, rows never mix
                from halserve.hal.triton.matmul import persistent_matmul

                y = persistent_matmul(x2, w.weight, bias)
            else:
                cfg = None
                if x2.shape[0] <= 16 and x2.dtype in (torch.bfloat16, torch.float16) and w.weight.dtype == x2.dtype:
                    from halserve.hal.triton import configs

                    cfg = configs.skinny_bf16_config(x2.shape[0], w.weight.shape[0], x2.shape[1])
                if cfg is not None:  # few rows, on a shape where streaming the weight beat cuBLAS
                    from halserve.hal.triton.skinny import skinny_matmul

                    y = skinny_matmul(x2, w.weight, bias=bias, cfg=cfg)
                else:
                    y = F.linear(x2, w.weight, bias)
        else:  # fp8 on sm_89+: supports() sends every other scheme to native or refuses it
            y = self._linear_fp8(x2, w, bias)
        y = y.view(*shape[:-1], y.shape[-1])
        if out is None:
            return y
        out.copy_(y)
        return out

    def _linear_fp8(self, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        from halserve.hal.triton import matmul as mm

        if w.act_scheme == "none":
            return mm.fp8_matmul(x, None, w.weight, w.scale, x.dtype, bias, fixed=self.batch_invariant)
        M = x.shape[0]
        if M <= 16 and not self.batch_invariant and x.dtype in (torch.bfloat16, torch.float16):
            # decode: stream the fp8 weight with split-K, activation quantized in the kernel
            from halserve.hal.triton.skinny import skinny_matmul

            return skinny_matmul(x, w.weight, w.scale, w.act_scheme, bias)
        if w.act_scheme == "per_token":
            xq, xs = mm.quant_fp8_per_token(x)
        else:
            xq, xs = mm.quant_fp8_per_tensor(x)
        if self.batch_invariant or self.device.type != "cuda":
            return mm.fp8_matmul(xq, xs, w.weight, w.scale, x.dtype, bias, fixed=self.batch_invariant)
        K = x.shape[1]
        N = w.weight.shape[0]
        if x.dtype != torch.bfloat16 or K % 16 or N % 16:
            impl = "triton"
        else:
            key = (min(1 << max(M - 1, 0).bit_length(), 8192), N, K, xs.numel() > 1, w.scale.numel() > 1)
            impl = self._fp8_choice.get(key)
            if impl is None:
                if self._graph_mode or _capturing():
                    impl = "triton" if M <= 64 else "scaled_mm"
                else:
                    impl = self._time_fp8(xq, xs, w, x.dtype)
                    self._fp8_choice[key] = impl
                    logger.debug("fp8 GEMM M~%d N=%d K=%d: %s", key[0], N, K, impl)
        if impl == "scaled_mm":
            return _scaled_mm(xq, xs, w, x.dtype, bias)
        return mm.fp8_matmul(xq, xs, w.weight, w.scale, x.dtype, bias)

    def _time_fp8(self, xq, xs, w, dtype) -> str:
        """'whichever measures faster': time cuBLASLt and the Triton GEMM once per shape."""
        from halserve.hal.triton import matmul as mm

        cands = {"scaled_mm": lambda: _scaled_mm(xq, xs, w, dtype, None),
                 "triton": lambda: mm.fp8_matmul(xq, xs, w.weight, w.scale, dtype)}
        best, best_t = "scaled_mm", float("inf")
        for name, f in cands.items():
            try:
                f()
                torch.cuda.synchronize(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    f()
                end.record()
                end.synchronize()
                t = start.elapsed_time(end)
            except Exception as e:  # e.g. a cuBLASLt layout it refuses
                logger.debug("fp8 candidate %s failed: %s", name, e)
                continue
            if t < best_t:
                best, best_t = name, t
        return best

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None):
        from halserve.hal.triton.elementwise import rms_norm

        return rms_norm(x, weight, eps, residual, out)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
        from halserve.hal.triton.elementwise import rotary

        rotary(positions, q, k, cos_sin_cache, is_neox)

    def silu_and_mul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        from halserve.hal.triton.elementwise import silu_and_mul

        return silu_and_mul(x, out)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        from halserve.hal.triton.elementwise import write_kv

        write_kv(key, value, kv_cache, slot_mapping, k_scale, v_scale)

    def rotary_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_sin_cache: torch.Tensor, is_neox: bool, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0,
                        q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                        norm_eps: float = 1e-6) -> None:
        from halserve.hal.triton.fused import rotary_write_kv

        rotary_write_kv(positions, q, k, v, cos_sin_cache, is_neox, kv_cache, slot_mapping, k_scale, v_scale,
                        q_norm_weight, k_norm_weight, norm_eps)

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, out: torch.Tensor | None = None, *, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> torch.Tensor:
        from halserve.hal.triton.attention import attention

        if q.stride(-1) != 1:
            q = q.contiguous()
        graph = self._graph_mode or _capturing()
        return attention(q, kv_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, meta.block_size,
                         meta.max_seqlen_q, None if graph else meta.max_seqlen_k, scale, meta.sliding_window,
                         out, self.batch_invariant, kv_len_bound=meta.max_seqlen_k, k_scale=k_scale,
                         v_scale=v_scale)

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, w13: PackedWeight,
            w2: PackedWeight, spec: MoeSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        from halserve.hal.triton.moe import fused_moe

        topk_w, topk_ids = route(router_logits, spec)
        s13 = w13.scale if w13.scheme == "fp8" else None
        s2 = w2.scale if w2.scheme == "fp8" else None
        return fused_moe(x, topk_w, topk_ids, w13.weight, s13, w2.weight, s2, out, fixed=self.batch_invariant)

    def sample(self, logits: torch.Tensor, params: SamplingTensors,
               out: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        if params.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            from halserve.hal.triton.sample import gumbel_argmax

            masked = None
            if not (params.no_top_k and params.no_top_p and params.no_min_p):
                masked = sampling_mask(logits, params)
            tokens = gumbel_argmax(logits, masked, params.temperature.float(), params.seeds, params.steps)
        if out is None:
            return tokens
        out.copy_(tokens)
        return out


def _scaled_mm(xq: torch.Tensor, xs: torch.Tensor, w: PackedWeight, dtype: torch.dtype,
               bias: torch.Tensor | None) -> torch.Tensor:
    """cuBLASLt FP8 GEMM. Per-token x per-channel runs as rowwise scaling ([M,1] x [1,N])."""
    M = xq.shape[0]
    N = w.weight.shape[0]
    ws = w.scale.float()
    if xs.numel() == 1 and ws.numel() == 1:
        y = torch._scaled_mm(xq, w.weight.t(), scale_a=xs.reshape(()), scale_b=ws.reshape(()), out_dtype=dtype)
    else:
        sa = xs.reshape(-1, 1).expand(M, 1).contiguous() if xs.numel() > 1 else xs.reshape(1, 1).expand(M, 1).contiguous()
        sb = ws.reshape(1, -1).expand(1, N).contiguous()
        y = torch._scaled_mm(xq, w.weight.t(), scale_a=sa, scale_b=sb, out_dtype=dtype)
    if isinstance(y, tuple):  # torch < 2.5 returned (out, amax)
        y = y[0]
    if bias is not None:
        y = y + bias
    return y
