"""RocmBackend: AMD Instinct GPUs through a ROCm build of torch (``torch.cuda`` is HIP there).

It is the CUDA backend's code path (Triton kernels, torch for the rest, HIP graphs through
``torch.cuda.graphs``) with three differences: the launch configs come from the CDNA table
of ``hal.triton.configs`` for the device's ``gcnArchName`` (wavefront 64, MFMA tile shapes,
``waves_per_eu``, ``matrix_instr_nonkdim``, ``kpack``, LDS limits); FP8 is the arch's format
(e4m3fnuz on gfx942, OCP e4m3fn on gfx950); FP8 GEMMs are Triton's only (no cuBLASLt race).

Without an AMD GPU the same class runs for checking: under ``TRITON_INTERPRET=1`` on the CPU
(``interpreter_ok()``), or on an NVIDIA GPU when built with ``arch=`` given. The configs are
then those of ``arch`` (``HALSERVE_ROCM_ARCH``, default gfx942) and FP8 is e4m3fn, the only
format those devices execute; ``describe()`` says so.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import torch

from halserve.hal.cuda import CudaBackend
from halserve.hal.interface import AttentionMetadata, Capabilities, MoeSpec, PackedWeight, ProbeResult, SamplingTensors
from halserve.hal.kv_fp8 import is_fp8
from halserve.hal.triton.configs import CDNA, forced_arch, interpreting

ARCH_ENV = "HALSERVE_ROCM_ARCH"
_FP4_SCHEMES = ("nvfp4", "fp4", "mxfp4")


def _hip() -> "str | None":
    return getattr(torch.version, "hip", None)


def device_arch(index: int = 0) -> str:
    """gfx name of a HIP device without the feature suffix ('gfx942:sramecc+:xnack-' -> 'gfx942')."""
    props = torch.cuda.get_device_properties(index)
    return (getattr(props, "gcnArchName", "") or "gfx?").split(":")[0]


def _env_arch() -> str:
    a = os.environ.get(ARCH_ENV, "gfx942")
    if a not in CDNA:
        raise ValueError(f"{ARCH_ENV}={a!r} is not a supported arch; use one of {', '.join(CDNA)}")
    return a


class RocmBackend(CudaBackend):
    name = "rocm"

    def __init__(self, device: "str | torch.device | None" = None, batch_invariant: bool = False,
                 arch: "str | None" = None):
        if device is None:
            device = "cpu" if interpreting() and not torch.cuda.is_available() else "cuda"
        super().__init__(device, batch_invariant)
        on_amd = self.device.type == "cuda" and bool(_hip())
        if on_amd:
            self.arch = device_arch(self.device.index)
            asked = arch or os.environ.get(ARCH_ENV)
            if asked and asked != self.arch:  # configs for another arch would be wrong here
                raise ValueError(f"arch {asked!r} (arch= or {ARCH_ENV}) does not match this GPU ({self.arch})")
        elif self.device.type == "cuda" and arch is None and ARCH_ENV not in os.environ:
            raise ValueError("rocm on a non-AMD GPU runs only as a check: pass arch='gfx942' or 'gfx950' "
                             f"(or set {ARCH_ENV})")
        else:
            self.arch = arch or _env_arch()
            if self.arch not in CDNA:
                raise ValueError(f"arch {self.arch!r} is not supported; use one of {', '.join(CDNA)}")
        self.on_amd = on_amd
        # the fp8 format the kernels really use: the arch's on AMD, e4m3fn where checked elsewhere
        fnuz = on_amd and CDNA[self.arch]["fp8"] == "e4m3fnuz"
        self.fp8_dtype = torch.float8_e4m3fnuz if fnuz else torch.float8_e4m3fn

    # ---- discovery ------------------------------------------------------------------------
    @classmethod
    def probe(cls) -> ProbeResult:
        try:
            hip = _hip()
            if not hip:
                cuda = getattr(torch.version, "cuda", None)
                build = f"a CUDA {cuda} build" if cuda else "a CPU-only build"
                return ProbeResult(0, f"torch {torch.__version__} is {build}, not ROCm (torch.version.hip is None); "
                                      "AMD GPUs need a ROCm build of torch", "cpu")
            if not torch.cuda.is_available():
                return ProbeResult(0, f"ROCm {hip} torch sees no AMD GPU (check HIP_VISIBLE_DEVICES and /dev/kfd)", "cpu")
            if importlib.util.find_spec("triton") is None:
                return ProbeResult(0, "triton is not installed (pip install triton from the ROCm index)", "cpu")
            idx = torch.cuda.current_device()
            a = device_arch(idx)
            name = torch.cuda.get_device_name(idx)
            if a not in CDNA:
                return ProbeResult(0, f"{name} is {a}; configs exist for {', '.join(CDNA)} only", f"cuda:{idx}")
            gib = torch.cuda.get_device_properties(idx).total_memory / 2**30
            return ProbeResult(100, f"{name}, {a} ({CDNA[a]['family']}, fp8 {CDNA[a]['fp8']}), {gib:.0f} GiB",
                               f"cuda:{idx}")
        except Exception as e:  # probe never raises
            return ProbeResult(0, f"ROCm probe failed: {e}", "cpu")

    @property
    def capabilities(self) -> Capabilities:
        base = super().capabilities
        fmt = "e4m3fnuz" if self.fp8_dtype == torch.float8_e4m3fnuz else "e4m3"
        return Capabilities(quant_schemes=("none", "int8", "fp8"), fp8_formats=(fmt,), fp4_formats=(),
                            graphs=base.graphs, batch_invariant=True, pin_memory=base.pin_memory)

    def supports(self, op: str, **spec: Any) -> "bool | str":
        scheme = spec.get("scheme")
        if scheme in _FP4_SCHEMES:
            return "refused: FP4 kernels are not implemented for rocm (gfx950 has MXFP4 MFMA; gfx942 has none)"
        if op in ("write_kv", "rotary_write_kv", "attention") and is_fp8(spec.get("kv_dtype")):
            # the cache is OCP e4m3fn; gfx942 reads fnuz, and no AMD run has checked the kernels
            return "native fallback: rocm's KV kernels are not checked with an fp8 cache"
        return super().supports(op, **spec)

    def describe(self) -> str:
        where = (f"{self.arch} ({CDNA[self.arch]['family']})" if self.on_amd else
                 f"check run of {self.arch} configs on {self.device_name} (fp8 as e4m3fn; not AMD hardware)")
        base = super(CudaBackend, self).describe()  # backend, device, accelerated and native ops
        return f"{base} arch={where} gemm=Triton fp8={self.capabilities.fp8_formats[0]}"

    # ---- weights ------------------------------------------------------------------------------
    def pack_weight(self, weight: torch.Tensor, scheme: str = "none", *,
                    act_scheme: "str | None" = None) -> PackedWeight:
        w = super().pack_weight(weight, scheme, act_scheme=act_scheme)
        if w.scheme == "fp8" and self.fp8_dtype != w.weight.dtype:
            w = to_fnuz(w)
        return w

    # ---- ops: CudaBackend's kernels under this arch's configs -----------------------------------
    def linear(self, x: torch.Tensor, w: PackedWeight, bias: "torch.Tensor | None" = None,
               out: "torch.Tensor | None" = None) -> torch.Tensor:
        with forced_arch(self.arch):
            return CudaBackend.linear(self, x, w, bias, out)

    def _linear_fp8(self, x: torch.Tensor, w: PackedWeight, bias: "torch.Tensor | None") -> torch.Tensor:
        from halserve.hal.triton import matmul as mm

        if w.act_scheme == "none":
            return mm.fp8_matmul(x, None, w.weight, w.scale, x.dtype, bias, fixed=self.batch_invariant)
        quant = mm.quant_fp8_per_token if w.act_scheme == "per_token" else mm.quant_fp8_per_tensor
        xq, xs = quant(x, self.fp8_dtype)
        return mm.fp8_matmul(xq, xs, w.weight, w.scale, x.dtype, bias, fixed=self.batch_invariant)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: "torch.Tensor | None" = None, out: "torch.Tensor | None" = None):
        with forced_arch(self.arch):
            return CudaBackend.rms_norm(self, x, weight, eps, residual, out)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
        with forced_arch(self.arch):
            return CudaBackend.rotary(self, positions, q, k, cos_sin_cache, is_neox)

    def silu_and_mul(self, x: torch.Tensor, out: "torch.Tensor | None" = None) -> torch.Tensor:
        with forced_arch(self.arch):
            return CudaBackend.silu_and_mul(self, x, out)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        with forced_arch(self.arch):
            return CudaBackend.write_kv(self, key, value, kv_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)

    def rotary_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_sin_cache: torch.Tensor, is_neox: bool, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0,
                        q_norm_weight: "torch.Tensor | None" = None, k_norm_weight: "torch.Tensor | None" = None,
                        norm_eps: float = 1e-6) -> None:
        with forced_arch(self.arch):
            return CudaBackend.rotary_write_kv(self, positions, q, k, v, cos_sin_cache, is_neox, kv_cache,
                                               slot_mapping, k_scale=k_scale, v_scale=v_scale,
                                               q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
                                               norm_eps=norm_eps)

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, out: "torch.Tensor | None" = None, *, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> torch.Tensor:
        with forced_arch(self.arch):
            return CudaBackend.attention(self, q, kv_cache, meta, scale, out, k_scale=k_scale, v_scale=v_scale)

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, w13: PackedWeight,
            w2: PackedWeight, spec: MoeSpec, out: "torch.Tensor | None" = None) -> torch.Tensor:
        with forced_arch(self.arch):
            return CudaBackend.moe(self, x, router_logits, w13, w2, spec, out)

    def sample(self, logits: torch.Tensor, params: SamplingTensors,
               out: "torch.Tensor | None" = None) -> torch.Tensor:
        with forced_arch(self.arch):
            return CudaBackend.sample(self, logits, params, out)


def to_fnuz(w: PackedWeight) -> PackedWeight:
    """e4m3fn -> e4m3fnuz, exactly: the same bits read as fnuz are the value halved (fnuz's
    exponent bias is one larger), so the scale doubles; fn's -0 (0x80) is NaN in fnuz -> 0."""
    bits = w.weight.view(torch.uint8)
    bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    return dataclasses.replace(w, weight=bits.view(torch.float8_e4m3fnuz), scale=w.scale * 2.0)
