"""NativeBackend: every HAL op in pure torch, on any torch device.

This is the portable fallback and the base class of every other backend: a backend
overrides the ops it accelerates and inherits the rest. Ops compute in float32 and store in
the input dtype. Nothing here syncs with the host except where noted (``moe`` loops over the
experts that received tokens; ``attention`` loops over sequences using the host-side
lengths in the metadata).

The math other backends and the models share lives in small modules beside this one
(``rope``, ``quant``, ``rng``, ``sampling``, ``routing``) and device chores in ``device``;
they are re-exported here so ``from halserve.hal.native import route`` keeps working.
"""
from __future__ import annotations

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
from halserve.hal import device as _dev
from halserve.hal.kv_fp8 import is_fp8, quantize_kv
from halserve.hal.quant import (  # noqa: F401  (re-exported)
    ACT_SCHEMES, FP8_DTYPE, FP8_MAX, INT8_MAX, WEIGHT_SCHEMES, dequant, quant_act_fp8, quantize)
from halserve.hal.rng import counter_uniform  # noqa: F401
from halserve.hal.rope import build_rope_cache, rope_params_from_hf_config  # noqa: F401
from halserve.hal.routing import route
from halserve.hal.span_attention import attend_spans
from halserve.hal.sampling import sample_random, sampling_mask  # noqa: F401

# the old private names, for callers written before the split

# ops that move bytes and never compute: any dtype goes
_DATA_MOVES = ("write_kv", "swap_blocks", "copy_blocks")
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- helpers -----------------------------------------------------------------------------

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


# ---- the backend -------------------------------------------------------------------------

def _gather_kv(cache: torch.Tensor, table: torch.Tensor, nblk: int) -> torch.Tensor:
    """[..., nblk] block ids -> [..., hk, nblk * block_size, d] float32 (keys or values)."""
    x = cache[table[..., :nblk].to(torch.int64)]  # [..., nblk, bs, hk, d]
    x = x.flatten(-4, -3)  # [..., L, hk, d]
    return x.transpose(-3, -2).float()


def _raw(t: torch.Tensor) -> torch.Tensor:
    """An fp8 KV tensor as its bytes: torch's CPU index_copy/index_select have no fp8 kernels,
    and moving blocks is a byte copy anyway."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def _dequant_blocks(kv_cache: torch.Tensor, tables: torch.Tensor, nblk: int, k_scale: float,
                    v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp8 cache: the first ``nblk`` blocks of each row of ``tables`` dequantized to a
    compact float32 cache [2, S * nblk, ...], and the tables into it. The attention paths
    then read it as any cache: the fp8 read rule lives here alone."""
    s = tables.shape[0]
    idx = tables[:, :nblk].reshape(-1).to(torch.int64)
    kv = _raw(kv_cache)[:, idx].view(kv_cache.dtype).float()
    kv[0] *= k_scale
    kv[1] *= v_scale
    return kv, torch.arange(s * nblk, dtype=torch.int32, device=tables.device).view(s, nblk)


def causal_mask(qlen: int, slen: int, window: int | None, device=None) -> torch.Tensor:
    """[qlen, slen] bool: query i (at position slen - qlen + i) sees key j when j <= its
    position and, with a sliding window, j > its position - window."""
    qpos = torch.arange(slen - qlen, slen, device=device)[:, None]
    kpos = torch.arange(slen, device=device)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed = allowed & (kpos > qpos - window)
    return allowed


def _attend_one(q: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor, slen: int, bs: int,
                window: int | None, scale: float, spans: bool = False) -> torch.Tensor:
    """One sequence: q [qlen, hq, d] are the last qlen positions of a slen-token context.
    GQA without copying K/V per query head: the query heads of one KV head are packed
    along the query axis. ``spans``: batch-invariant, a token's bits the same in any chunk
    or as a decode row (hal/span_attention.py)."""
    qlen, hq, d = q.shape
    nblk = (slen + bs - 1) // bs
    k = _gather_kv(kv_cache[0], table, nblk)[:, :slen]  # [hk, slen, d]
    v = _gather_kv(kv_cache[1], table, nblk)[:, :slen]
    if spans:
        return attend_spans(q, k, v, window, scale)
    hk = k.shape[0]
    group = hq // hk
    qg = q.float().view(qlen, hk, group, d).permute(1, 2, 0, 3).reshape(hk, group * qlen, d)
    mask = causal_mask(qlen, slen, window, q.device).expand(group, qlen, slen).reshape(group * qlen, slen)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [hk, group*qlen, d]
    return o.view(hk, group, qlen, d).permute(2, 0, 1, 3).reshape(qlen, hq, d)


# The last decode batch's gather rows and mask, reused by every layer of a step: they
# depend on the block tables and lengths only, never on the layer. Keyed on the metadata
# object itself (held, so its id cannot be reused) and its host lengths.
_DECODE_ROWS: list = [None]


def _decode_rows(tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int, bs: int,
                 window: int | None, key: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For B decode rows padded to ``max_len`` keys: the flat cache row ([blocks * bs] axis)
    of every (row, position) [B * max_len] int64, and the attention mask [B, 1, 1, max_len].
    ``key`` (the step's AttentionMetadata, with the lengths) reuses the last answer."""
    hit = _DECODE_ROWS[0]
    if key is not None and hit is not None and hit[0] is key[0] and hit[1] == key[1:]:
        return hit[2], hit[3]
    pos = torch.arange(max_len, device=tables.device)
    rows = tables.to(torch.int64).index_select(1, pos // bs).mul_(bs).add_(pos % bs).view(-1)
    last = seq_lens.to(torch.int64)[:, None] - 1
    allowed = pos[None, :] <= last
    if window is not None:
        allowed = allowed & (pos[None, :] > last - window)
    mask = allowed[:, None, None, :]
    if key is not None:
        _DECODE_ROWS[0] = (key[0], key[1:], rows, mask)
    return rows, mask


def _decode_batch(q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor, seq_lens: torch.Tensor,
                  max_len: int, bs: int, window: int | None, scale: float, out: torch.Tensor,
                  key: Any = None) -> None:
    """B decode rows at once over contexts padded to max_len (masked). K and V are gathered
    as whole rows (index_select over the flattened [blocks * bs] axis, the same for every
    layer: see ``_decode_rows``), upcast to float32 in that one copy unless q and the cache
    are both bf16 (then SDPA reads them as they are and accumulates in float32 itself); a cache
    that needs more than an upcast to read (fp8) is converted before it comes here (attention)."""
    b, hq, d = q.shape
    hk = kv_cache.shape[-2]
    rows, mask = _decode_rows(tables, seq_lens, max_len, bs, window, key)
    # K and V in one gather and one upcast (two parallel regions a layer, not four)
    kv = kv_cache.reshape(2, -1, hk, d).index_select(1, rows).view(2, b, max_len, hk, d).transpose(2, 3)
    # bf16 K/V go to SDPA as they are (it accumulates in float32 inside, as HF's decode does):
    # the float32 upcast of every layer's whole context cost native ~8% of a batched step
    work = torch.bfloat16 if q.dtype == kv.dtype == torch.bfloat16 else torch.float32
    kv = kv.to(work)
    k, v = kv[0], kv[1]
    qg = q.to(work).view(b, hk, hq // hk, d)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    out.copy_(o.reshape(b, hq, d))


class NativeBackend(Backend):
    """Every op in pure torch on any torch device (float32, bfloat16, float16)."""

    name = "native"
    _native_root = True  # this class's op bodies are the native ops every backend falls back to

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
        if dtype is not None and op not in _DATA_MOVES:
            name = _DTYPES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else str(dtype)
            if name not in self.capabilities.dtypes:
                return f"refused: dtype {name} not in {self.capabilities.dtypes}"
        kv = spec.get("kv_dtype")
        if op in ("write_kv", "rotary_write_kv", "attention") and kv is not None and not is_fp8(kv):
            name = _DTYPES.get(kv, str(kv).removeprefix("torch."))
            if name not in self.capabilities.dtypes:
                return f"refused: KV cache dtype {name} is not float32, bfloat16, float16 or float8_e4m3fn"
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
        return _dev.memory_info(self.device)

    def synchronize(self) -> None:
        _dev.synchronize(self.device)

    def pin_host(self, t: torch.Tensor):
        """Page-lock ``t`` for this device's copies where the device wants it (CUDA)."""
        return _dev.pin_host(self.device, t)

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
        q, scale = quantize(weight, stored, gran)
        return PackedWeight(q, stored, scale, act, n, k)

    # ---- ops ------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        bi = self.batch_invariant
        if w.scheme == "none":
            y = _gemm(x, w.weight, bias, bi)
        elif w.scheme == "int8" or w.act_scheme == "none":
            y = _gemm(x, dequant(w, x.dtype), bias, bi)
        elif w.scheme == "fp8":
            y = _gemm(quant_act_fp8(x, w.act_scheme), dequant(w, torch.float32), None, bi)
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
        # torch adds two bf16/fp16 tensors in float32 and rounds once: the same h as an
        # explicit upcast, without two float copies
        h = x if residual is None else (x + residual).to(x.dtype)
        hf = h.float()
        if hf.device.type == "cpu":
            # one fused pass on CPU, bitwise equal to the composite below (checked by
            # tests/hal/test_native.py); other devices keep the composite's exact op order
            y = F.rms_norm(hf, (hf.shape[-1],), weight.float(), eps)
        else:
            y = hf * torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True).add_(eps))
            y.mul_(weight)
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
        # Both halves are computed before either is written (a float32 part is t itself) and
        # written straight into t, the copy rounding to t's dtype: no cat, no .to. On a CPU
        # every op over torch's grain is a parallel region, which a shared box makes costly.
        first, second = (slice(0, rot // 2), slice(rot // 2, rot)) if is_neox else \
            (slice(0, rot, 2), slice(1, rot, 2))
        for t in (q, k):
            part = t[..., :rot].float()
            x1, x2 = part[..., first], part[..., second]
            a, b = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            t[..., first] = a
            t[..., second] = b

    def silu_and_mul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        i = x.shape[-1] // 2
        # one upcast of both halves: a mixed-dtype mul_ on a CPU upcasts its operand in a
        # temporary anyway (one parallel region more than this)
        xf = x.float()
        y = F.silu(xf[..., :i], inplace=xf is not x).mul_(xf[..., i:])
        if out is None:
            return y.to(x.dtype)
        out.copy_(y)
        return out

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        if slot_mapping.numel() == 0:
            return
        slots = slot_mapping.to(torch.int64)
        valid = slots >= 0
        # Slots of -1 are redirected to repeat another row's write (same slot, same value),
        # so duplicates are harmless and nothing needs a host sync to filter them.
        donor = torch.argmax(valid.to(torch.int32))  # first valid row, or 0 if none
        any_valid = valid.any()
        fp8 = is_fp8(kv_cache.dtype)
        for i, (src, sc) in enumerate(((key, k_scale), (value, v_scale))):
            flat = kv_cache[i].view(-1, *kv_cache.shape[-2:])
            if fp8:
                flat, src = _raw(flat), _raw(quantize_kv(src, sc))
            else:
                src = src.to(flat.dtype)
            # index_select with a one-element index tensor: indexing by a 0-dim tensor would
            # read it on the host, which a CUDA graph capture forbids
            d = donor.view(1)
            donor_slot = torch.where(any_valid, slots.index_select(0, d), torch.zeros_like(d))
            donor_val = torch.where(any_valid, src.index_select(0, d), flat[0])
            idx = torch.where(valid, slots, donor_slot)
            vals = torch.where(valid[:, None, None], src, donor_val)
            flat.index_copy_(0, idx, vals)

    def rotary_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_sin_cache: torch.Tensor, is_neox: bool, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0,
                        q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                        norm_eps: float = 1e-6) -> None:
        # the composite through the dispatcher: a backend without a fused kernel keeps its
        # own rms_norm, rotary and write_kv; scales go only with an fp8 cache, as the engine
        # passes them (a backend that never holds one may leave them out of its write_kv)
        if (q_norm_weight is None) != (k_norm_weight is None):
            raise ValueError("rotary_write_kv: pass q_norm_weight and k_norm_weight together, or neither")
        if q_norm_weight is not None:
            for t, w in ((q, q_norm_weight), (k, k_norm_weight)):
                t.copy_(self.rms_norm(t.reshape(-1, t.shape[-1]), w, norm_eps).view(t.shape))
        self.rotary(positions, q, k, cos_sin_cache, is_neox)
        scales = {"k_scale": k_scale, "v_scale": v_scale} if is_fp8(kv_cache.dtype) else {}
        self.write_kv(k, v, kv_cache, slot_mapping, **scales)

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, out: torch.Tensor | None = None, *, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(q)
        bs = meta.block_size
        window = meta.sliding_window
        tables = meta.block_tables
        if is_fp8(kv_cache.dtype) and meta.num_seqs:
            nblk = -(-max(meta.seq_lens_host) // bs)  # host lengths bound the device ones
            kv_cache, tables = _dequant_blocks(kv_cache, tables, nblk, k_scale, v_scale)
        # Decode rows (one query each) run as one padded batch; batch-invariant mode keeps
        # them per sequence so a row's reduction never depends on its batch mates.
        ndec = 0 if self.batch_invariant else meta.num_decode_seqs
        if ndec >= 1:  # reads lengths from the device tensors only, so it also replays in graphs
            # the gather rows are the same for every layer of the step: keyed on the metadata
            # (not when the tables are a per-layer dequantized copy's). Only where no step is
            # ever captured: a captured step's metadata is one object updated in place for
            # each replay, and an index built outside the capture would be replayed stale.
            key = (meta, ndec, tuple(meta.seq_lens_host[:ndec])) \
                if tables is meta.block_tables and not self.capabilities.graphs else None
            _decode_batch(q[:ndec], kv_cache, tables[:ndec], meta.seq_lens[:ndec],
                          max(meta.seq_lens_host[:ndec]), bs, window, scale, out[:ndec], key)
        else:
            ndec = 0
        start = ndec
        for i in range(ndec, meta.num_seqs):
            qlen, slen = meta.query_lens_host[i], meta.seq_lens_host[i]
            if qlen == 0:
                continue
            out[start:start + qlen] = _attend_one(q[start:start + qlen], kv_cache, tables[i],
                                                  slen, bs, window, scale, self.batch_invariant).to(out.dtype)
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
        src, dst = _raw(src), _raw(dst)
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
        stream = _dev.current_stream(dst_dev)
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
            cache = _raw(cache)
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
