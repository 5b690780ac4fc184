"""Slow, obviously-correct float64 oracles for every HAL op, used by tests and conformance.

Each function takes the same inputs as the backend op and returns new float64 tensors (or
int64 token ids); nothing is written in place. They are written for clarity, not speed,
and deliberately avoid sharing code with ``native.py`` so a bug in one is not hidden by the
other: attention gathers keys slot by slot, routing walks groups in plain loops, rotary
rotates each pair explicitly.
"""
from __future__ import annotations

import math

import torch

from halserve.hal.interface import AttentionMetadata, MoeSpec, PackedWeight, SamplingTensors

F64 = torch.float64
FP8_MAX = 448.0


def dequantize(w: PackedWeight) -> torch.Tensor:
    """The weight a PackedWeight stands for, in float64."""
    if w.scheme == "none":
        return w.weight.to(F64)
    scale = w.scale.to(F64)
    if scale.numel() == 1:
        return w.weight.to(F64) * scale.reshape(())
    return w.weight.to(F64) * scale.reshape(*w.weight.shape[:-1], 1)


def quantize_activation(x: torch.Tensor, act_scheme: str) -> torch.Tensor:
    """Dynamic fp8 activation quantization as a W8A8 kernel does it, returned dequantized."""
    x = x.to(F64)
    if act_scheme == "none":
        return x
    if act_scheme == "per_token":
        amax = x.abs().amax(dim=-1, keepdim=True)
    elif act_scheme == "per_tensor":
        amax = x.abs().amax()
    else:
        raise ValueError(f"act_scheme {act_scheme!r} is not valid; use none, per_tensor or per_token")
    scale = (amax.clamp(min=1e-12) / FP8_MAX).to(torch.float32).to(F64)
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.to(F64) * scale


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    xa = quantize_activation(x, w.act_scheme) if w.scheme == "fp8" else x.to(F64)
    y = xa @ dequantize(w).T
    return y if bias is None else y + bias.to(F64)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """norm(x) * weight, or (norm(x + residual) * weight, x + residual)."""
    h = x.to(F64) if residual is None else x.to(F64) + residual.to(F64)
    rms = torch.sqrt((h * h).mean(dim=-1, keepdim=True) + eps)
    y = h / rms * weight.to(F64)
    return y if residual is None else (y, h)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
           is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each pair (a, b) of the first rot_dim dims by the position's angle: neox pairs
    dim j with j + rot/2, gpt-j pairs 2j with 2j + 1."""
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    table = cos_sin_cache.cpu().to(F64)[positions.cpu().long()]  # [T, rot]
    results = []
    for t in (q, k):
        src = t.cpu().to(F64)
        res = src.clone()
        for j in range(half):
            a, b = (j, j + half) if is_neox else (2 * j, 2 * j + 1)
            cos, sin = table[:, None, j], table[:, None, half + j]
            xa, xb = src[:, :, a], src[:, :, b]
            res[:, :, a] = xa * cos - xb * sin
            res[:, :, b] = xb * cos + xa * sin
        results.append(res)
    return results[0], results[1]


def rope_cache(rot_dim: int, max_pos: int, base: float) -> torch.Tensor:
    """Unscaled cos|sin table in float64 (the textbook formula)."""
    inv = torch.tensor([base ** (-(2 * i) / rot_dim) for i in range(rot_dim // 2)], dtype=F64)
    ang = torch.arange(max_pos, dtype=F64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x = x.to(F64)
    i = x.shape[-1] // 2
    g, u = x[..., :i], x[..., i:]
    return g / (1 + torch.exp(-g)) * u


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> torch.Tensor:
    """The cache after the write, as a new tensor of the cache's dtype."""
    cache = kv_cache.clone()
    bs = cache.shape[2]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        cache[0, slot // bs, slot % bs] = key[t].to(cache.dtype)
        cache[1, slot // bs, slot % bs] = value[t].to(cache.dtype)
    return cache


def attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float) -> torch.Tensor:
    """Causal paged GQA attention in float64; keys are fetched slot by slot."""
    hq = q.shape[1]
    hk = kv_cache.shape[-2]
    bs = meta.block_size
    out = torch.zeros(q.shape, dtype=F64)
    tables = meta.block_tables.cpu().tolist()
    cu = meta.cu_seqlens_q.cpu().tolist()
    seq_lens = meta.seq_lens.cpu().tolist()
    cache = kv_cache.cpu().to(F64)
    for i, slen in enumerate(seq_lens):
        qlen = cu[i + 1] - cu[i]
        slots = [(tables[i][p // bs], p % bs) for p in range(slen)]
        keys = torch.stack([cache[0, b, o] for b, o in slots])  # [slen, hk, d]
        vals = torch.stack([cache[1, b, o] for b, o in slots])
        for j in range(qlen):
            pos = slen - qlen + j
            lo = 0 if meta.sliding_window is None else max(0, pos - meta.sliding_window + 1)
            qv = q[cu[i] + j].cpu().to(F64)  # [hq, d]
            for h in range(hq):
                kh = h * hk // hq
                s = keys[lo:pos + 1, kh] @ qv[h] * scale
                p = torch.softmax(s, dim=0)
                out[cu[i] + j, h] = p @ vals[lo:pos + 1, kh]
    return out


def route(router_logits: torch.Tensor, spec: MoeSpec) -> list[list[tuple[int, float]]]:
    """Per token: [(expert, weight)] in float64, by plain loops over groups and experts."""
    logits = router_logits.cpu().to(F64)
    bias = None if spec.correction_bias is None else spec.correction_bias.cpu().to(F64).tolist()
    t, e = logits.shape
    result = []
    for row in logits.tolist():
        if spec.scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + (bias[i] if bias else 0.0) for i, s in enumerate(scores)]
        eligible = set(range(e))
        if spec.num_expert_group > 1:
            size = e // spec.num_expert_group
            gscores = []
            for g in range(spec.num_expert_group):
                members = sorted(choice[g * size:(g + 1) * size], reverse=True)
                gscores.append(sum(members[:2]) if spec.scoring == "sigmoid" else members[0])
            best = sorted(range(spec.num_expert_group), key=lambda g: -gscores[g])[:spec.topk_group]
            eligible = {g * size + j for g in best for j in range(size)}
        chosen = sorted(eligible, key=lambda i: -choice[i])[:spec.top_k]
        weights = [scores[i] for i in chosen]
        if spec.renormalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        weights = [w * spec.routed_scaling_factor for w in weights]
        result.append(list(zip(chosen, weights)))
    return result


def moe(x: torch.Tensor, router_logits: torch.Tensor, w13: PackedWeight, w2: PackedWeight,
        spec: MoeSpec) -> torch.Tensor:
    x64 = x.cpu().to(F64)
    gate_up = dequantize(w13).cpu()
    down = dequantize(w2).cpu()
    inter = gate_up.shape[1] // 2
    out = torch.zeros(x.shape, dtype=F64)
    for t, picks in enumerate(route(router_logits, spec)):
        for e, w in picks:
            g = gate_up[e, :inter] @ x64[t]
            u = gate_up[e, inter:] @ x64[t]
            out[t] += w * (down[e] @ (g / (1 + torch.exp(-g)) * u))
    return out


def sampling_probs(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """The distribution [B, V] float64 each row is drawn from: one-hot argmax for
    temperature 0, else softmax(logits / T) restricted to top-k, then top-p (smallest
    prefix of the sorted distribution reaching p), then min-p, and renormalised."""
    lg = logits.cpu().to(F64)
    b, v = lg.shape
    probs = torch.zeros(b, v, dtype=F64)
    for r in range(b):
        temp = float(params.temperature[r])
        if temp == 0:
            probs[r, int(lg[r].argmax())] = 1.0
            continue
        p = torch.softmax(lg[r] / temp, dim=0)
        order = torch.argsort(p, descending=True, stable=True).tolist()
        allowed = order
        k = int(params.top_k[r])
        if 0 < k < v:
            allowed = allowed[:k]
        top_p = float(params.top_p[r])
        if top_p < 1.0:
            pl = p.tolist()
            mass = sum(pl[i] for i in allowed)
            kept, acc = [], 0.0
            for i in allowed:
                kept.append(i)
                acc += pl[i] / mass
                if acc >= top_p:
                    break
            allowed = kept
        min_p = float(params.min_p[r])
        if min_p > 0:
            pmax = float(p[allowed[0]])
            allowed = [i for i in allowed if float(p[i]) >= min_p * pmax]
        idx = torch.tensor(allowed, dtype=torch.long)
        probs[r, idx] = p[idx]
        probs[r] /= probs[r].sum()
    return probs


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> torch.Tensor:
    """dst after the copy, as a new tensor."""
    res = dst.clone()
    for i, j in block_mapping.tolist():
        res[:, j] = src[:, i].to(res.device)
    return res


def copy_blocks(kv_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> list[torch.Tensor]:
    results = []
    for cache in kv_caches:
        res = cache.clone()
        for i, j in block_mapping.tolist():
            res[:, j] = cache[:, i]
        results.append(res)
    return results


def nmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Σ(a−e)² / Σe² in float64; inf when ``actual`` holds NaN/inf or shapes differ."""
    if actual.shape != expected.shape:
        return math.inf
    a = actual.detach().cpu().to(F64)
    e = expected.detach().cpu().to(F64)
    if not torch.isfinite(a).all():
        return math.inf
    num = float(((a - e) ** 2).sum())
    den = float((e ** 2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
