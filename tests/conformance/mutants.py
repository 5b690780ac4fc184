"""The mutation corpus: backends with one planted bug each, the kind real kernel authors make.

Each mutant subclasses NativeBackend, overrides ONE op (``op``) and claims it accelerated.
Correct work is delegated to a private NativeBackend instance (``self._ref``), never to
``super()``, so only the planted bug can make a mutant fail — except ``HiddenFallback``, whose
bug is exactly a ``super()`` call behind an accelerated claim. test_mutants.py asserts that
every one FAILS the quick conformance cases of its op.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from halserve.hal.interface import AttentionMetadata, ProbeResult
from halserve.hal.native import NativeBackend


class Mutant(NativeBackend):
    name = "mutant"
    op: ClassVar[str] = ""
    expect: ClassVar[str] = ""  # a phrase the failure must give, where the bug has a telltale

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.name = "m_" + cls.__name__.lower()

    def __init__(self, device=None, batch_invariant: bool = False):
        super().__init__(device, batch_invariant)
        self._ref = NativeBackend(self.device, batch_invariant)

    @classmethod
    def probe(cls):
        return ProbeResult(0, "planted bug (test double)")


def _into(out, y):
    if out is None:
        return y
    out.copy_(y)
    return out


# ---- rms_norm ------------------------------------------------------------------------------

class RmsEpsIgnored(Mutant):
    """eps dropped from the rsqrt (fine on unit-variance inputs)."""
    op = "rms_norm"

    def rms_norm(self, x, weight, eps, residual=None, out=None):
        return self._ref.rms_norm(x, weight, 0.0, residual, out=out)


class RmsEpsTimes10(Mutant):
    """eps read from a config field ten times too large."""
    op = "rms_norm"

    def rms_norm(self, x, weight, eps, residual=None, out=None):
        return self._ref.rms_norm(x, weight, eps * 10, residual, out=out)


class RmsResidualNotAdded(Mutant):
    """With a residual, returns x instead of x + residual as the new residual."""
    op = "rms_norm"

    def rms_norm(self, x, weight, eps, residual=None, out=None):
        if residual is None:
            return self._ref.rms_norm(x, weight, eps, out=out)
        y, _ = self._ref.rms_norm(x, weight, eps, residual, out=out)
        return y, x.clone()


# ---- silu_and_mul --------------------------------------------------------------------------

class SiluHalvesSwappedWithoutOut(Mutant):
    """The no-out= path (the engine's) computes silu(up) * gate; the out= path is right."""
    op = "silu_and_mul"
    expect = "disagree"  # in the failing detail

    def silu_and_mul(self, x, out=None):
        if out is not None:
            return self._ref.silu_and_mul(x, out=out)
        i = x.shape[-1] // 2
        return self._ref.silu_and_mul(torch.cat([x[:, i:], x[:, :i]], dim=1))


class SiluOutNotWritten(Mutant):
    """Returns ``out`` but computed into a temporary that is never copied back."""
    op = "silu_and_mul"

    def silu_and_mul(self, x, out=None):
        y = self._ref.silu_and_mul(x)
        return y if out is None else out


class HiddenFallback(Mutant):
    """Claims silu_and_mul accelerated, but the kernel 'falls back' by calling super()."""
    op = "silu_and_mul"
    expect = "hidden fallback"  # in the failing detail

    def silu_and_mul(self, x, out=None):
        return super().silu_and_mul(x, out=out)


# ---- linear --------------------------------------------------------------------------------

class LinearBiasDropped(Mutant):
    op = "linear"

    def linear(self, x, w, bias=None, out=None):
        return self._ref.linear(x, w, None, out=out)


class LinearPerChannelScaleAsPerTensor(Mutant):
    """Reads scale[0] for every output channel (per-channel scales taken as per-tensor)."""
    op = "linear"

    def linear(self, x, w, bias=None, out=None):
        if w.scale is not None and w.scale.numel() > 1:
            w = replace(w, scale=w.scale.reshape(-1)[:1].clone())
        return self._ref.linear(x, w, bias, out=out)


class LinearActQuantSkipped(Mutant):
    """W8A8 fp8 run weight-only: the activation is never quantized."""
    op = "linear"

    def linear(self, x, w, bias=None, out=None):
        if w.scheme == "fp8":
            w = replace(w, act_scheme="none")
        return self._ref.linear(x, w, bias, out=out)


class LinearWritesPastOut(Mutant):
    """Rounds the output up to a whole tile and stores the tail past the end of out."""
    op = "linear"
    expect = "past the end of out"  # in the failing detail

    def linear(self, x, w, bias=None, out=None):
        y = self._ref.linear(x, w, bias, out=out)
        if y.untyped_storage().nbytes() >= (y.storage_offset() + y.numel() + 8) * y.element_size():
            torch.as_strided(y, (y.numel() + 8,), (1,), y.storage_offset())[y.numel():] = 0
        return y


# ---- rotary --------------------------------------------------------------------------------

class RotaryStyleSwapped(Mutant):
    """gpt-j and neox pairings swapped."""
    op = "rotary"

    def rotary(self, positions, q, k, cos_sin_cache, is_neox=True):
        self._ref.rotary(positions, q, k, cos_sin_cache, not is_neox)


class RotaryPartialPairsByHeadDim(Mutant):
    """Partial rotary pairs dim j with j + head_dim/2 (not j + rot_dim/2) and rotates past rot_dim."""
    op = "rotary"
    expect = "past rot_dim"  # in the failing detail

    def rotary(self, positions, q, k, cos_sin_cache, is_neox=True):
        rot, d = cos_sin_cache.shape[-1], q.shape[-1]
        if rot < d:
            half, full = rot // 2, d // 2
            cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
            n = cos.shape[0]
            cos = torch.cat([cos, cos.new_ones(n, full - half)], 1)
            sin = torch.cat([sin, sin.new_zeros(n, full - half)], 1)
            cos_sin_cache = torch.cat([cos, sin], 1)
        self._ref.rotary(positions, q, k, cos_sin_cache, is_neox)


class RotaryPositionOffByOne(Mutant):
    op = "rotary"

    def rotary(self, positions, q, k, cos_sin_cache, is_neox=True):
        pos = (positions + 1).clamp(max=cos_sin_cache.shape[0] - 1)
        self._ref.rotary(pos, q, k, cos_sin_cache, is_neox)


class RotaryOnContiguousCopy(Mutant):
    """Wrong strides: rotates q.contiguous() / k.contiguous(), so strided views never change."""
    op = "rotary"
    expect = "disagree"  # in the failing detail

    def rotary(self, positions, q, k, cos_sin_cache, is_neox=True):
        qc, kc = q.contiguous(), k.contiguous()
        self._ref.rotary(positions, qc, kc, cos_sin_cache, is_neox)
        if q.is_contiguous():
            q.copy_(qc)
        if k.is_contiguous():
            k.copy_(kc)


# ---- write_kv ------------------------------------------------------------------------------

class WriteKvSlotOffByOne(Mutant):
    op = "write_kv"

    def write_kv(self, key, value, kv_cache, slot_mapping):
        slots = torch.where(slot_mapping >= 0, slot_mapping + 1, slot_mapping)
        total = kv_cache.shape[1] * kv_cache.shape[2]
        self._ref.write_kv(key, value, kv_cache, torch.where(slots >= total, -1, slots))


class WriteKvPaddingWritten(Mutant):
    """Slot -1 is not skipped: it lands on the last slot of the cache."""
    op = "write_kv"

    def write_kv(self, key, value, kv_cache, slot_mapping):
        total = kv_cache.shape[1] * kv_cache.shape[2]
        self._ref.write_kv(key, value, kv_cache, torch.where(slot_mapping < 0, total - 1, slot_mapping))


class WriteKvStorageBase(Mutant):
    """A C kernel that takes the storage's base pointer, not the tensor's: right for layer 0
    of a stacked cache or a fresh tensor, wrong for any other view."""
    op = "write_kv"
    expect = "stacked"  # in the failing detail

    def write_kv(self, key, value, kv_cache, slot_mapping):
        base = torch.as_strided(kv_cache, kv_cache.shape, kv_cache.stride(), 0)
        self._ref.write_kv(key, value, base, slot_mapping)


# ---- rotary_write_kv -----------------------------------------------------------------------

class FusedCachesUnrotatedK(Mutant):
    """The fused kernel stores k into the cache as loaded, before rotating it (q, k right)."""
    op = "rotary_write_kv"
    expect = "cache elements differ"

    def rotary_write_kv(self, positions, q, k, v, cos_sin_cache, is_neox, kv_cache, slot_mapping, **scales):
        self._ref.write_kv(k, v, kv_cache, slot_mapping, **scales)
        self._ref.rotary(positions, q, k, cos_sin_cache, is_neox)


class FusedKNotStoredBack(Mutant):
    """The rotated k goes to the cache only: k itself is left unrotated (attention of the
    new token then reads the cache, but a kernel that reads k would not)."""
    op = "rotary_write_kv"

    def rotary_write_kv(self, positions, q, k, v, cos_sin_cache, is_neox, kv_cache, slot_mapping, **scales):
        kc = k.clone()
        self._ref.rotary(positions, q, kc, cos_sin_cache, is_neox)
        self._ref.write_kv(kc, v, kv_cache, slot_mapping, **scales)


class FusedDropsKvScales(Mutant):
    """An fp8 cache written with scale 1 (the fused kernel's signature lost the scales)."""
    op = "rotary_write_kv"

    def rotary_write_kv(self, positions, q, k, v, cos_sin_cache, is_neox, kv_cache, slot_mapping, **scales):
        self._ref.rotary(positions, q, k, cos_sin_cache, is_neox)
        self._ref.write_kv(k, v, kv_cache, slot_mapping)


class FusedNormAfterRotary(Mutant):
    """Qwen3's q/k RMSNorm applied after the rotation (the norm weight then lands on the wrong
    lanes; the rms itself is the same: a rotation keeps each row's norm)."""
    op = "rotary_write_kv"

    def rotary_write_kv(self, positions, q, k, v, cos_sin_cache, is_neox, kv_cache, slot_mapping, *,
                        q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6, **scales):
        self._ref.rotary(positions, q, k, cos_sin_cache, is_neox)
        if q_norm_weight is not None:
            for t, w in ((q, q_norm_weight), (k, k_norm_weight)):
                t.copy_(self._ref.rms_norm(t.reshape(-1, t.shape[-1]), w, norm_eps).view(t.shape))
        self._ref.write_kv(k, v, kv_cache, slot_mapping, **scales)


class FusedNormEpsIgnored(Mutant):
    """The fused kernel's q/k norm drops eps (fine on unit-variance heads)."""
    op = "rotary_write_kv"

    def rotary_write_kv(self, positions, q, k, v, cos_sin_cache, is_neox, kv_cache, slot_mapping, *,
                        norm_eps=1e-6, **kw):
        self._ref.rotary_write_kv(positions, q, k, v, cos_sin_cache, is_neox, kv_cache, slot_mapping,
                                  norm_eps=0.0, **kw)


# ---- attention -----------------------------------------------------------------------------

def _attention(q, kv_cache, meta: AttentionMetadata, scale, out=None, *, causal_shift=0, window_shift=0,
               cached_prefix=True, gqa="div", decode_len_from_row0=False):
    """A plain per-sequence attention with bug knobs (all off: correct)."""
    hq, hk, d = q.shape[1], kv_cache.shape[-2], q.shape[-1]
    heads = torch.arange(hq) // (hq // hk) if gqa == "div" else torch.arange(hq) % hk
    bs = meta.block_size
    res = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    cu = meta.cu_seqlens_q.cpu().tolist()
    tables = meta.block_tables.cpu()
    for i, slen in enumerate(meta.seq_lens_host):
        qlen = cu[i + 1] - cu[i]
        if qlen == 0:
            continue
        if decode_len_from_row0 and i < meta.num_decode_seqs:
            slen = meta.seq_lens_host[0]
        nblk = (slen + bs - 1) // bs
        blocks = tables[i, :nblk].to(kv_cache.device).long()
        k = kv_cache[0].index_select(0, blocks).reshape(-1, hk, d)[:slen].float()[:, heads.to(q.device)]
        v = kv_cache[1].index_select(0, blocks).reshape(-1, hk, d)[:slen].float()[:, heads.to(q.device)]
        qs = q[cu[i]:cu[i + 1]].float()
        s = torch.einsum("qhd,khd->hqk", qs, k) * scale
        qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
        kpos = torch.arange(slen, device=q.device)[None, :]
        ok = kpos <= qpos + causal_shift
        if meta.sliding_window is not None:
            ok &= kpos > qpos - (meta.sliding_window + window_shift)
        if not cached_prefix:
            ok &= kpos >= slen - qlen
        s = s.masked_fill(~ok[None], -math.inf)
        res[cu[i]:cu[i + 1]] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
    return _into(out, res.to(q.dtype))


class AttentionScaleIgnored(Mutant):
    """Uses 1/sqrt(head_dim) instead of the scale it was given."""
    op = "attention"

    def attention(self, q, kv_cache, meta, scale, out=None):
        return _attention(q, kv_cache, meta, q.shape[-1] ** -0.5, out)


class AttentionWindowOffByOne(Mutant):
    op = "attention"

    def attention(self, q, kv_cache, meta, scale, out=None):
        return _attention(q, kv_cache, meta, scale, out, window_shift=1)


class AttentionCausalOffByOne(Mutant):
    """Each query also sees the key one position after it."""
    op = "attention"

    def attention(self, q, kv_cache, meta, scale, out=None):
        return _attention(q, kv_cache, meta, scale, out, causal_shift=1)


class AttentionIgnoresCachedPrefix(Mutant):
    """A prefill chunk attends only to its own new tokens, not to the cached context."""
    op = "attention"

    def attention(self, q, kv_cache, meta, scale, out=None):
        return _attention(q, kv_cache, meta, scale, out, cached_prefix=False)


class AttentionGqaModulo(Mutant):
    """Query head h reads KV head h % kv_heads instead of h // (heads / kv_heads)."""
    op = "attention"

    def attention(self, q, kv_cache, meta, scale, out=None):
        return _attention(q, kv_cache, meta, scale, out, gqa="mod")


class AttentionDecodeLenFromRow0(Mutant):
    """One batch row read from another: every decode row uses the first row's context length."""
    op = "attention"

    def attention(self, q, kv_cache, meta, scale, out=None):
        return _attention(q, kv_cache, meta, scale, out, decode_len_from_row0=True)


# ---- moe -----------------------------------------------------------------------------------

class MoeRenormalizeIgnored(Mutant):
    op = "moe"

    def moe(self, x, router_logits, w13, w2, spec, out=None):
        return self._ref.moe(x, router_logits, w13, w2, replace(spec, renormalize=False), out=out)


class MoeCorrectionBiasInWeights(Mutant):
    """The correction bias (meant for choosing experts only) also goes into the weights."""
    op = "moe"

    def moe(self, x, router_logits, w13, w2, spec, out=None):
        if spec.correction_bias is None:
            return self._ref.moe(x, router_logits, w13, w2, spec, out=out)
        # logit shift whose sigmoid/softmax score moves by about the bias
        shifted = router_logits + spec.correction_bias.float()[None] * 4
        return self._ref.moe(x, shifted, w13, w2, replace(spec, correction_bias=None), out=out)


class MoeScalingFactorIgnored(Mutant):
    op = "moe"

    def moe(self, x, router_logits, w13, w2, spec, out=None):
        return self._ref.moe(x, router_logits, w13, w2, replace(spec, routed_scaling_factor=1.0), out=out)


class MoeGroupsIgnored(Mutant):
    """Grouped routing (num_expert_group / topk_group) ignored: plain top-k over all experts."""
    op = "moe"

    def moe(self, x, router_logits, w13, w2, spec, out=None):
        return self._ref.moe(x, router_logits, w13, w2, replace(spec, num_expert_group=1, topk_group=1), out=out)


class MoeAlwaysSoftmax(Mutant):
    op = "moe"

    def moe(self, x, router_logits, w13, w2, spec, out=None):
        return self._ref.moe(x, router_logits, w13, w2, replace(spec, scoring="softmax"), out=out)


# ---- swap_blocks / copy_blocks -------------------------------------------------------------

class SwapMappingReversed(Mutant):
    """Reads the mapping's columns as (dst, src)."""
    op = "swap_blocks"

    def swap_blocks(self, src, dst, block_mapping):
        m = block_mapping.flip(1)
        ok = (m[:, 0] < src.shape[1]) & (m[:, 1] < dst.shape[1])
        self._ref.swap_blocks(src, dst, m[ok].contiguous())


class SwapOnlyKeys(Mutant):
    op = "swap_blocks"

    def swap_blocks(self, src, dst, block_mapping):
        for i, j in block_mapping.tolist():
            dst[0, j] = src[0, i].to(dst.device)


class CopyBlocksFirstLayerOnly(Mutant):
    op = "copy_blocks"

    def copy_blocks(self, kv_caches, block_mapping):
        self._ref.copy_blocks(kv_caches[:1], block_mapping)


# ---- sample --------------------------------------------------------------------------------

class SampleSeedIgnored(Mutant):
    op = "sample"
    expect = "seeds ignored"  # in the failing detail

    def sample(self, logits, params, out=None):
        return self._ref.sample(logits, replace(params, seeds=torch.zeros_like(params.seeds)), out=out)


class SampleStepIgnored(Mutant):
    op = "sample"
    expect = "steps ignored"  # in the failing detail

    def sample(self, logits, params, out=None):
        return self._ref.sample(logits, replace(params, steps=torch.zeros_like(params.steps)), out=out)


class SampleTopPIgnoredOnOddRows(Mutant):
    op = "sample"

    def sample(self, logits, params, out=None):
        odd = torch.arange(params.top_p.shape[0], device=params.top_p.device) % 2 == 1
        return self._ref.sample(logits, replace(params, top_p=torch.where(odd, 1.0, params.top_p)), out=out)


class SampleTopKIgnored(Mutant):
    op = "sample"

    def sample(self, logits, params, out=None):
        return self._ref.sample(logits, replace(params, top_k=torch.zeros_like(params.top_k), no_top_k=True),
                                out=out)


class SampleParamsFromRow0(Mutant):
    """One batch row read from another: every row samples with row 0's filters."""
    op = "sample"

    def sample(self, logits, params, out=None):
        first = {f: getattr(params, f)[:1].expand_as(getattr(params, f)).contiguous()
                 for f in ("temperature", "top_k", "top_p", "min_p")}
        return self._ref.sample(logits, replace(params, **first, all_greedy=bool(first["temperature"][0] == 0),
                                                all_random=bool(first["temperature"][0] > 0)), out=out)


class SampleTemperatureSquared(Mutant):
    """Divides the logits by temperature twice (once in the kernel, once before it)."""
    op = "sample"

    def sample(self, logits, params, out=None):
        t = torch.where(params.temperature > 0, params.temperature, 1.0)
        return self._ref.sample(logits / t[:, None], params, out=out)


MUTANTS: list[type[Mutant]] = [c for c in list(globals().values())
                               if isinstance(c, type) and issubclass(c, Mutant) and c is not Mutant]
