"""Rope tables shared by the models and every backend: ``build_rope_cache`` and
``rope_params_from_hf_config`` (the same float32 math as transformers, bit for bit)."""
from __future__ import annotations

import math

import torch


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


def _dynamic_base(dim: int, base: float, s: dict) -> float:
    # transformers' NTK base at its initial length (max_position_embeddings), in the same
    # float64 steps: ~base, but not always bit-equal to it. Past that length transformers
    # rescales per call; the engine never goes there (max_model_len <= max_position_embeddings).
    factor, mpe = s.get("factor", 1.0), s.get("max_position_embeddings")
    if not mpe:
        return base
    return base * ((factor * mpe / mpe) - (factor - 1)) ** (dim / (dim - 2))


def _longrope_inv_freq(dim: int, base: float, max_pos: int, s: dict) -> tuple[torch.Tensor, float]:
    missing = [k for k in ("original_max_position_embeddings", "short_factor") if s.get(k) is None]
    if missing:
        raise ValueError(f"rope type 'longrope' needs {' and '.join(missing)}")
    orig = s["original_max_position_embeddings"]
    if max_pos > orig:
        # transformers switches every position of a sequence to long_factor once the sequence
        # outgrows orig (keys already cached keep short_factor): no per-position table is it
        raise ValueError(f"rope type 'longrope' with max_position_embeddings={max_pos} > "
                         f"original_max_position_embeddings={orig} is not supported (only the "
                         f"short_factor range, max_position_embeddings <= {orig})")
    short = s["short_factor"]
    if len(short) != dim // 2:
        raise ValueError(f"rope type 'longrope': short_factor has {len(short)} entries, need {dim // 2}")
    factor = s.get("factor") or s["max_position_embeddings"] / orig
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(short, dtype=torch.float32) * base ** shape), float(attn)


def build_rope_cache(head_dim: int, rot_dim: int, max_pos: int, base: float,
                     scaling: dict | None = None, device: "str | torch.device | None" = None) -> torch.Tensor:
    """cos/sin table [max_pos, rot_dim] float32: cos in the first rot_dim/2 columns, sin in
    the rest. ``scaling`` is a HF rope_scaling / rope_parameters dict (``rope_type`` or
    ``type``): None/'default', 'linear', 'llama3', 'yarn', 'longrope' (its short_factor range
    only: max_pos <= original_max_position_embeddings); 'dynamic' gives transformers' table at
    its initial length (exact up to max_position_embeddings). Matches transformers'
    float32 computation exactly (computed on the CPU, then moved to ``device``)."""
    if rot_dim <= 0 or rot_dim % 2 or rot_dim > head_dim:
        raise ValueError(f"rot_dim={rot_dim} must be even and in (0, head_dim={head_dim}]")
    s = dict(scaling or {})
    kind = s.get("rope_type") or s.get("type") or "default"
    attn = 1.0
    if kind == "default":
        inv_freq = _inv_freq(rot_dim, base)
    elif kind == "dynamic":
        inv_freq = _inv_freq(rot_dim, _dynamic_base(rot_dim, base, s))
    elif kind == "linear":
        inv_freq = _inv_freq(rot_dim, base) / s["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(_inv_freq(rot_dim, base), s)
    elif kind == "yarn":
        inv_freq, attn = _yarn_inv_freq(rot_dim, base, s)
    elif kind == "longrope":
        inv_freq, attn = _longrope_inv_freq(rot_dim, base, max_pos, s)
    else:
        raise ValueError(f"rope type {kind!r} is not supported; use default, linear, llama3, yarn, "
                         f"longrope or dynamic")
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
        # as transformers: a top-level original_max_position_embeddings (Phi-3 style) wins
        if cfg.get("original_max_position_embeddings"):
            merged["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        merged.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    if "max_position_embeddings" in cfg:
        merged.setdefault("max_position_embeddings", cfg["max_position_embeddings"])
    return float(base), merged
