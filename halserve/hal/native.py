"""NativeBackend: every HAL op in pure torch, on any torch device.

This is the portable fallback and the base class of every other backend: a backend
overrides the ops it accelerates and inherits the rest. Ops compute in float32 and store in
the input dtype. Nothing here syncs with the host except where noted (``moe`` loops over the
experts that received tokens; ``attention`` loops over sequences using the host-side
lengths in the metadata).

Also home of the rope tables: ``build_rope_cache`` and ``rope_params_from_hf_config``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from halserve.hal.interface import (
    OPS,
    AttentionMetadata,
    Backend,
    Capabilities,
    MoeSpec,
    PackedWeight,
    ProbeResult,
    SamplingTensors,
)

logger = logging.getLogger("halserve")
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0

# pack_weight scheme names -> (stored scheme, weight scale granularity, default act scheme)
WEIGHT_SCHEMES: dict[str, tuple[str, str, str]] = {
    "none": ("none", "", "none"),
    "int8": ("int8", "per_channel", "none"),  # weight-only: dequantize then GEMM
    "fp8": ("fp8", "per_channel", "per_token"),  # W8A8: per-channel weight x per-token act
    "fp8_per_tensor": ("fp8", "per_tensor", "per_tensor"),
    "fp8_weight_only": ("fp8", "per_channel", "none"),
}
ACT_SCHEMES = ("none", "per_tensor", "per_token")
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- rope tables -------------------------------------------------------------------------

def _inv_freq(dim: int, base: float) -> torch.Tensor:
    # Same float32 expression as transformers, so the tables match it bit for bit.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    factor = s.get("factor")
    orig = s["original_max_position_embeddings"]
    if factor is None:
        factor = s["max_position_embeddings"] / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn = float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
        else:
            attn = mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extra = 1.0 / pos_freqs
    inter = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return inter * (1 - keep) + extra * keep, float(attn)


def build_rope_cache(head_dim: int, rot_dim: int, max_pos: int, base: float,
                     scaling: dict | None = None, device: "str | torch.device | None" = None) -> torch.Tensor:
    """cos/sin table [max_pos, rot_dim] float32: cos in the first rot_dim/2 columns, sin in
    the rest. ``scaling`` is a HF rope_scaling / rope_parameters dict (``rope_type`` or
    ``type``): None/'default', 'linear', 'llama3', 'yarn'; 'dynamic' gives the unscaled
    table (exact up to the original max_position_embeddings). Matches transformers'
    float32 computation exactly (computed on the CPU, then moved to ``device``)."""
    if rot_dim <= 0 or rot_dim % 2 or rot_dim > head_dim:
        raise ValueError(f"rot_dim={rot_dim} must be even and in (0, head_dim={head_dim}]")
    s = dict(scaling or {})
    kind = s.get("rope_type") or s.get("type") or "default"
    attn = 1.0
    if kind in ("default", "dynamic"):
        inv_freq = _inv_freq(rot_dim, base)
    elif kind == "linear":
        inv_freq = _inv_freq(rot_dim, base) / s["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(_inv_freq(rot_dim, base), s)
    elif kind == "yarn":
        inv_freq, attn = _yarn_inv_freq(rot_dim, base, s)
    else:
        raise ValueError(f"rope type {kind!r} is not supported; use default, linear, llama3, yarn or dynamic")
    freqs = torch.arange(max_pos, dtype=torch.int64).float()[:, None] * inv_freq.float()
    cos, sin = freqs.cos(), freqs.sin()
    if attn != 1.0:
        cos, sin = cos * attn, sin * attn
    return torch.cat([cos, sin], dim=-1).contiguous().to(device or "cpu")


def rope_params_from_hf_config(cfg: dict) -> tuple[float, dict | None]:
    """(base, scaling) from a HF config dict, in either form: transformers 4 (``rope_theta``
    + ``rope_scaling``) or transformers 5 (``rope_parameters`` holding ``rope_theta``; when
    nested per layer type, the 'full_attention' entry is used). ``scaling`` is None for
    plain rope, else a dict with ``rope_type`` and the keys ``build_rope_cache`` reads."""
    params = dict(cfg.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        params = dict(params.get("full_attention") or next(iter(params.values())))
    legacy = dict(cfg.get("rope_scaling") or {})
    merged = {**legacy, **params}
    base = merged.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if kind == "default":
        return float(base), None
    merged["rope_type"] = kind
    merged.pop("type", None)
    if kind in ("llama3", "yarn", "longrope"):
        merged.setdefault("original_max_position_embeddings",
                          cfg.get("original_max_position_embeddings") or cfg.get("max_position_embeddings"))
    if "max_position_embeddings" in cfg:
        merged.setdefault("max_position_embeddings", cfg["max_position_embeddings"])
    return float(base), merged


# ---- counter-based random numbers --------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x < 2^32 using 16-bit halves of c: every product < 2^48, so
    # int64 never overflows on any device.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mixer (xorshift-multiply, 'lowbias32' constants) on int64 lanes."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms [B, n] float32 in (0, 1), a pure function of (seeds[b], steps[b], column).

    This exact bit recipe is shared with the Triton sampler (``hal/triton/sample.py``), so
    seeded draws agree across backends: change both together or neither."""
    seeds, steps = seeds.to(torch.int64), steps.to(torch.int64)
    h = _mix32((seeds & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seeds >> 32) & _M32))
    h = _mix32(h ^ (steps & _M32) ^ 0x85EBCA6B)
    h = _mix32(h ^ ((steps >> 32) & _M32))
    col = torch.arange(n, device=seeds.device, dtype=torch.int64)
    x = _mix32(h[:, None] ^ _mix32(col ^ 0x27D4EB2F)[None, :])
    x = _mix32(x ^ h[:, None])
    # 23 random bits -> odd multiples of 2^-24: exactly representable, never 0 or 1.
    return ((x >> 9) * 2 + 1).to(torch.float32) * (1.0 / (1 << 24))


# ---- helpers -----------------------------------------------------------------------------

def _dequant(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as a plain [.., N, K] tensor of ``dtype``."""
    if w.scheme == "none":
        return w.weight.to(dtype)
    scale = w.scale.float()
    if scale.numel() > 1:
        scale = scale.reshape(*w.weight.shape[:-1], 1)
    return (w.weight.float() * scale).to(dtype)


def _quant_act_fp8(x: torch.Tensor, act_scheme: str) -> torch.Tensor:
    """Simulate dynamic fp8 activation quantization: x -> fp8 -> float32."""
    xf = x.float()
    if act_scheme == "per_token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        amax = xf.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.float() * scale


def _quantize(weight: torch.Tensor, qtype: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    wf = weight.float()
    qmax = INT8_MAX if qtype == "int8" else FP8_MAX
    if granularity == "per_tensor":
        amax = wf.abs().amax().reshape(1)
        scale = amax.clamp(min=1e-12) / qmax
        s = scale
    else:
        amax = wf.abs().amax(dim=-1)
        scale = amax.clamp(min=1e-12) / qmax
        s = scale[..., None]
    if qtype == "int8":
        q = torch.round(wf / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = (wf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.to(torch.float32)


BATCH_INVARIANT_ROWS = 16


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, batch_invariant: bool) -> torch.Tensor:
    """F.linear; in batch-invariant mode every row goes through a GEMM of the same fixed
    shape ([16, K], zero-padded), because CPU BLAS picks different kernels (and reduction
    orders) by M: a row's result then never depends on how many rows came with it."""
    if not batch_invariant:
        return F.linear(x, w, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    pad = (-m) % BATCH_INVARIANT_ROWS
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, k)])
    y = torch.cat([F.linear(c, w, bias) for c in x2.split(BATCH_INVARIANT_ROWS)])
    return y[:m].reshape(*lead, -1)


def _read_meminfo() -> tuple[int, int] | None:
    try:
        vals = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                vals[key] = int(rest.split()[0]) * 1024
        return vals.get("MemAvailable", vals.get("MemFree", 0)), vals["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


# ---- the backend -------------------------------------------------------------------------

def _gather_kv(cache: torch.Tensor, table: torch.Tensor, nblk: int) -> torch.Tensor:
    """[..., nblk] block ids -> [..., hk, nblk * block_size, d] float32 (keys or values)."""
    x = cache[table[..., :nblk].to(torch.int64)]  # [..., nblk, bs, hk, d]
    x = x.flatten(-4, -3)  # [..., L, hk, d]
    return x.transpose(-3, -2).float()


def _attend_one(q: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor, slen: int, bs: int,
                window: int | None, scale: float) -> torch.Tensor:
    """One sequence: q [qlen, hq, d] are the last qlen positions of a slen-token context.
    GQA without copying K/V per query head: the query heads of one KV head are packed
    along the query axis."""
    qlen, hq, d = q.shape
    nblk = (slen + bs - 1) // bs
    k = _gather_kv(kv_cache[0], table, nblk)[:, :slen]  # [hk, slen, d]
    v = _gather_kv(kv_cache[1], table, nblk)[:, :slen]
    hk = k.shape[0]
    group = hq // hk
    qg = q.float().view(qlen, hk, group, d).permute(1, 2, 0, 3).reshape(hk, group * qlen, d)
    qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
    kpos = torch.arange(slen, device=q.device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed = allowed & (kpos > qpos - window)
    mask = allowed.expand(group, qlen, slen).reshape(group * qlen, slen)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [hk, group*qlen, d]
    return o.view(hk, group, qlen, d).permute(2, 0, 1, 3).reshape(qlen, hq, d)


def _decode_batch(q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor, seq_lens: torch.Tensor,
                  max_len: int, bs: int, window: int | None, scale: float, out: torch.Tensor) -> None:
    """B decode rows at once over contexts padded to max_len (masked)."""
    b, hq, d = q.shape
    nblk = (max_len + bs - 1) // bs
    k = _gather_kv(kv_cache[0], tables, nblk)  # [B, hk, L, d]
    v = _gather_kv(kv_cache[1], tables, nblk)
    hk, length = k.shape[1], k.shape[2]
    kpos = torch.arange(length, device=q.device)[None, :]
    last = seq_lens.to(torch.int64)[:, None] - 1
    allowed = kpos <= last
    if window is not None:
        allowed = allowed & (kpos > last - window)
    qg = q.float().view(b, hk, hq // hk, d)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=allowed[:, None, None, :], scale=scale)
    out.copy_(o.reshape(b, hq, d))


class NativeBackend(Backend):
    """Every op in pure torch on any torch device (float32, bfloat16, float16)."""

    name = "native"

    def __init__(self, device: "str | torch.device | None" = None, batch_invariant: bool = False):
        super().__init__(torch.device(device or "cpu"), batch_invariant)
        self._last_swap_map = None  # swap_blocks's last mapping, uploaded (see _swap_mapping)

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(1, "pure torch, runs everywhere", "cpu")

    @property
    def capabilities(self) -> Capabilities:
        fp8 = FP8_DTYPE is not None
        return Capabilities(
            quant_schemes=("none", "int8", "fp8") if fp8 else ("none", "int8"),
            fp8_formats=("e4m3",) if fp8 else (),
        )

    def supports(self, op: str, **spec: Any) -> "bool | str":
        """Refusals for specs no torch path can run; otherwise the native ops are this
        backend's own implementation (True) and the base rule applies to subclasses."""
        if op not in OPS:
            return f"refused: unknown op {op!r}; ops are {', '.join(OPS)}"
        dtype = spec.get("dtype")
        if dtype is not None:
            name = _DTYPES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else str(dtype)
            if name not in self.capabilities.dtypes:
                return f"refused: dtype {name} not in {self.capabilities.dtypes}"
        if op == "linear" and "scheme" in spec:
            scheme = spec["scheme"]
            stored = WEIGHT_SCHEMES.get(scheme, (scheme,))[0]
            if stored not in self.capabilities.quant_schemes:
                return f"refused: quant scheme {scheme!r} not in {self.capabilities.quant_schemes}"
        if type(self) is NativeBackend:
            return True
        return super().supports(op, **spec)

    # ---- memory, layout -------------------------------------------------------------------
    def memory_info(self) -> tuple[int, int]:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return int(free), int(total)
        info = _read_meminfo()
        if info is not None:
            return info
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pin_host(self, t: torch.Tensor):
        """On a CUDA device: register ``t``'s memory with the driver (cudaHostRegister)."""
        if self.device.type != "cuda":
            return None
        cudart = torch.cuda.cudart()
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        err = cudart.cudaHostRegister(ptr, nbytes, 0)
        if int(err) != 0:
            # the failure stays this thread's last CUDA error, which torch's next kernel
            # launch check would report as its own: clear it
            _cuda_clear_last_error()
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {cudart.cudaGetErrorString(err)}")
        return lambda: cudart.cudaHostUnregister(ptr)

    def pack_weight(self, weight: torch.Tensor, scheme: str = "none", *,
                    act_scheme: str | None = None) -> PackedWeight:
        """Scheme 'none' keeps the weight; 'int8' is symmetric per-channel weight-only;
        'fp8' is per-channel e4m3 weight with per-token dynamic activations (W8A8);
        'fp8_per_tensor' per-tensor weight and activations; 'fp8_weight_only'.
        ``act_scheme`` overrides the activation scheme. Works on [N, K] and [E, N, K]."""
        if scheme not in WEIGHT_SCHEMES:
            raise ValueError(f"quant scheme {scheme!r} is not valid; use {', '.join(WEIGHT_SCHEMES)}")
        stored, gran, act = WEIGHT_SCHEMES[scheme]
        act = act_scheme or act
        if act not in ACT_SCHEMES:
            raise ValueError(f"act_scheme {act!r} is not valid; use {', '.join(ACT_SCHEMES)}")
        n, k = weight.shape[-2], weight.shape[-1]
        if stored == "none":
            return PackedWeight(weight, "none", None, "none", n, k)
        if stored == "fp8" and FP8_DTYPE is None:
            raise ValueError("quant scheme 'fp8' needs torch.float8_e4m3fn (torch >= 2.1)")
        q, scale = _quantize(weight, stored, gran)
        return PackedWeight(q, stored, scale, act, n, k)

    # ---- ops ------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        bi = self.batch_invariant
        if w.scheme == "none":
            y = _gemm(x, w.weight, bias, bi)
        elif w.scheme == "int8" or w.act_scheme == "none":
            y = _gemm(x, _dequant(w, x.dtype), bias, bi)
        elif w.scheme == "fp8":
            y = _gemm(_quant_act_fp8(x, w.act_scheme), _dequant(w, torch.float32), None, bi)
            if bias is not None:
                y = y + bias.float()
            y = y.to(x.dtype)
        else:
            raise ValueError(f"PackedWeight scheme {w.scheme!r} is not valid; use none, int8 or fp8")
        if out is None:
            return y
        out.copy_(y)
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None):
        h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
        hf = h.float()
        y = hf * torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
        if out is None:
            out = y.to(x.dtype)
        else:
            out.copy_(y)
        return out if residual is None else (out, h)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
        rot = cos_sin_cache.shape[-1]
        cs = cos_sin_cache.index_select(0, positions.to(torch.int64)).float()
        cos, sin = cs[:, None, : rot // 2], cs[:, None, rot // 2:]
        for t in (q, k):
            part = t[..., :rot].float()
            if is_neox:
                x1, x2 = part[..., : rot // 2], part[..., rot // 2:]
                new = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
            else:
                x1, x2 = part[..., 0::2], part[..., 1::2]
                new = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
            t[..., :rot] = new.to(t.dtype)

    def silu_and_mul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        i = x.shape[-1] // 2
        y = F.silu(x[..., :i].float()) * x[..., i:].float()
        if out is None:
            return y.to(x.dtype)
        out.copy_(y)
        return out

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        if slot_mapping.numel() == 0:
            return
        slots = slot_mapping.to(torch.int64)
        valid = slots >= 0
        # Slots of -1 are redirected to repeat another row's write (same slot, same value),
        # so duplicates are harmless and nothing needs a host sync to filter them.
        donor = torch.argmax(valid.to(torch.int32))  # first valid row, or 0 if none
        any_valid = valid.any()
        for i, src in enumerate((key, value)):
            flat = kv_cache[i].view(-1, *kv_cache.shape[-2:])
            src = src.to(flat.dtype)
            donor_slot = torch.where(any_valid, slots[donor], torch.zeros_like(slots[donor]))
            donor_val = torch.where(any_valid, src[donor], flat[0])
            idx = torch.where(valid, slots, donor_slot)
            vals = torch.where(valid[:, None, None], src, donor_val)
            flat.index_copy_(0, idx, vals)

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(q)
        bs = meta.block_size
        window = meta.sliding_window
        # Decode rows (one query each) run as one padded batch; batch-invariant mode keeps
        # them per sequence so a row's reduction never depends on its batch mates.
        ndec = 0 if self.batch_invariant else meta.num_decode_seqs
        if ndec >= 1:  # reads lengths from the device tensors only, so it also replays in graphs
            _decode_batch(q[:ndec], kv_cache, meta.block_tables[:ndec], meta.seq_lens[:ndec],
                          max(meta.seq_lens_host[:ndec]), bs, window, scale, out[:ndec])
        else:
            ndec = 0
        start = ndec
        for i in range(ndec, meta.num_seqs):
            qlen, slen = meta.query_lens_host[i], meta.seq_lens_host[i]
            if qlen == 0:
                continue
            out[start:start + qlen] = _attend_one(q[start:start + qlen], kv_cache, meta.block_tables[i],
                                                  slen, bs, window, scale).to(out.dtype)
            start += qlen
        return out

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, w13: PackedWeight,
            w2: PackedWeight, spec: MoeSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        topk_w, topk_ids = route(router_logits, spec)
        acc = torch.zeros(x.shape[0], w2.weight.shape[-2], dtype=torch.float32, device=x.device)
        flat_ids = topk_ids.flatten()
        # Host sync: which experts got tokens (acceptable for the portable path).
        for e in torch.unique(flat_ids).tolist():
            hit = (flat_ids == e).nonzero().squeeze(1)
            tok = hit // spec.top_k
            xe = x.index_select(0, tok)
            g_u = _gemm(xe, _expert_weight(w13, e, x.dtype), None, self.batch_invariant).float()
            inter = g_u.shape[-1] // 2
            h = (F.silu(g_u[:, :inter]) * g_u[:, inter:]).to(x.dtype)
            y = _gemm(h, _expert_weight(w2, e, x.dtype), None, self.batch_invariant).float()
            # a token picks an expert at most once, so plain indexing accumulates safely
            acc[tok] += y * topk_w.flatten()[hit][:, None]
        if out is None:
            return acc.to(x.dtype)
        out.copy_(acc)
        return out

    def swap_blocks(self, src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> None:
        if block_mapping.numel() == 0:
            return
        n = block_mapping.shape[0]
        on_dst, on_src, staged = self._swap_mapping(block_mapping, src.device, dst.device)
        if staged:  # a staging buffer: move it as one piece
            moved = src[:, :n]
        else:
            moved = src.index_select(1, on_src[:, 0])
        if moved.device != dst.device:
            moved = moved.to(dst.device, non_blocking=moved.is_pinned())
        dst.index_copy_(1, on_dst[:, 1], moved)

    def _swap_mapping(self, mapping: torch.Tensor, src_dev: torch.device, dst_dev: torch.device):
        """``mapping`` where each side reads it, and whether its source rows are 0..n-1.

        The index moves are asynchronous (whole, contiguous rows: a pinned mapping is not
        staged through pageable memory), so a chain of calls queues up behind one device
        copy instead of waiting for it each time. One mapping is often used for every layer
        in turn: it is uploaded once and kept (with a reference, so its memory cannot be
        reused under it) while the same tensor comes back on the same stream (the contract:
        a mapping is not changed once passed)."""
        stream = torch.cuda.current_stream(dst_dev) if dst_dev.type == "cuda" else None
        key = (src_dev, dst_dev, stream)
        last = self._last_swap_map
        if last is not None and last[0] is mapping and last[1] == key:
            return last[2]
        n = mapping.shape[0]
        on_dst = mapping.to(dst_dev, non_blocking=True)
        on_src = on_dst if src_dev == dst_dev else mapping.to(src_dev, non_blocking=True)
        staged = bool(torch.equal(mapping[:, 0].cpu(), torch.arange(n)))
        self._last_swap_map = (mapping, key, (on_dst, on_src, staged))
        return on_dst, on_src, staged

    def copy_blocks(self, kv_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
        if block_mapping.numel() == 0:
            return
        for cache in kv_caches:
            src_idx = block_mapping[:, 0].to(cache.device)
            dst_idx = block_mapping[:, 1].to(cache.device)
            cache.index_copy_(1, dst_idx, cache.index_select(1, src_idx))

    def sample(self, logits: torch.Tensor, params: SamplingTensors,
               out: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        greedy = logits.argmax(dim=-1) if not params.all_random else None
        if params.all_greedy:
            tokens = greedy
        else:
            tokens = sample_random(logits, params)
            if greedy is not None:
                tokens = torch.where(params.temperature == 0, greedy, tokens)
        if out is None:
            return tokens
        out.copy_(tokens)
        return out


def _expert_weight(w: PackedWeight, e: int, dtype: torch.dtype) -> torch.Tensor:
    if w.scheme == "none":
        return w.weight[e].to(dtype)
    scale = w.scale.float()
    s = scale[e][:, None] if scale.dim() == 2 else scale.reshape(-1)[:1]
    return (w.weight[e].float() * s).to(dtype)


def route(router_logits: torch.Tensor, spec: MoeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing: (weights [T, k] float32, expert ids [T, k] int64). See ``MoeSpec``."""
    logits = router_logits.float()
    if spec.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif spec.scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"MoeSpec.scoring {spec.scoring!r} is not valid; use softmax or sigmoid")
    choice = scores if spec.correction_bias is None else scores + spec.correction_bias.float()
    if spec.num_expert_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, spec.num_expert_group, e // spec.num_expert_group)
        if spec.scoring == "sigmoid":
            gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            gscore = grouped.amax(dim=-1)
        best = gscore.topk(spec.topk_group, dim=-1).indices
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // spec.num_expert_group, dim=1),
                                    float("-inf"))
    ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights, ids


def sampling_mask(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Temperature-scaled logits [B, V] float32 with tokens outside the top-k / top-p / min-p
    set at -inf (the highest-logit token always survives)."""
    temp = params.temperature.float()
    scaled = logits / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    vocab = logits.shape[-1]
    if not (params.no_top_k and params.no_top_p):
        sorted_l, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        drop = torch.zeros_like(sorted_l, dtype=torch.bool)
        if not params.no_top_k:
            k = params.top_k.to(torch.int64)
            k = torch.where((k <= 0) | (k >= vocab), torch.full_like(k, vocab), k)
            drop |= rank >= k[:, None]
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        if not params.no_top_p:
            p = params.top_p.float()
            probs = torch.softmax(sorted_l, dim=-1)
            before = probs.cumsum(dim=-1) - probs
            drop |= (before > p[:, None]) & (p < 1.0)[:, None] & (rank > 0)
        drop = torch.zeros_like(drop).scatter_(1, order, drop)
        scaled = scaled.masked_fill(drop, float("-inf"))
    if not params.no_min_p:
        probs = torch.softmax(scaled, dim=-1)
        thresh = probs.amax(dim=-1, keepdim=True) * params.min_p.float()[:, None]
        scaled = scaled.masked_fill(probs < thresh, float("-inf"))
    return scaled


def sample_random(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Gumbel-max over the masked logits, noise from the counter-based hash."""
    masked = sampling_mask(logits, params)
    u = counter_uniform(params.seeds, params.steps, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (masked + gumbel).argmax(dim=-1)


def _cuda_clear_last_error() -> None:
    """``cudaGetLastError`` (which also resets it) in the CUDA runtime torch loaded; torch's
    ``cudart()`` bindings lack it."""
    import ctypes

    path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcudart" in line:
                    path = line.split()[-1]
                    break
    except OSError:
        pass
    try:
        ctypes.CDLL(path).cudaGetLastError()  # path None: the symbols already global
    except (OSError, AttributeError) as e:
        logger.debug("cannot reach cudaGetLastError (%s); a later CUDA call may report the failure", e)
