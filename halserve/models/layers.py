"""Model building blocks: each holds its weights and calls only the HAL.

Layers are plain objects (no autograd, no nn.Module): weights are read from the checkpoint
by the model file, packed once here through ``hal.pack_weight``, and never copied again.
Call them under ``torch.inference_mode()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from halserve.hal.interface import AttentionMetadata, Backend, MoeSpec


class Linear:
    """y = x W^T (+ b). Fused projections (qkv, gate_up) pass several weights; they are
    concatenated along the output dim before packing, and ``split`` gives the part sizes."""

    def __init__(self, hal: Backend, weights: torch.Tensor | list[torch.Tensor],
                 biases: list[torch.Tensor | None] | torch.Tensor | None = None, scheme: str = "none"):
        parts = weights if isinstance(weights, list) else [weights]
        self.split = [w.shape[0] for w in parts]
        self.hal = hal
        self.weight = hal.pack_weight(torch.cat(parts) if len(parts) > 1 else parts[0], scheme)
        self.bias = _cat_biases(biases, parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.hal.linear(x, self.weight, self.bias)


def _cat_biases(biases, parts: list[torch.Tensor]) -> torch.Tensor | None:
    if biases is None or isinstance(biases, torch.Tensor):
        return biases
    if all(b is None for b in biases):
        return None
    # a fused projection where only some parts have a bias: the others add zero
    return torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, parts)])


class Embedding:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class RMSNorm:
    """norm(x) * w; with ``residual`` it adds first and returns (normed, new residual)."""

    def __init__(self, hal: Backend, weight: torch.Tensor, eps: float):
        self.hal, self.weight, self.eps = hal, weight, eps

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.hal.rms_norm(x, self.weight, self.eps, residual)


class RotaryEmbedding:
    """Rotary embedding with the cos|sin cache built once by the native helper (the one
    place rope scaling is computed); ``is_neox`` picks rotate-halves vs interleaved pairs."""

    def __init__(self, hal: Backend, head_dim: int, rot_dim: int, max_pos: int, base: float,
                 scaling: dict | None, is_neox: bool = True, device=None):
        from halserve.hal.rope import build_rope_cache

        self.hal, self.is_neox = hal, is_neox
        self.cos_sin_cache = build_rope_cache(head_dim, rot_dim, max_pos, base, scaling, device=device)

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        self.hal.rotary(positions, q, k, self.cos_sin_cache, self.is_neox)


class Attention:
    """qkv -> optional per-head q/k RMSNorm -> rotary + write_kv (one op) -> paged attention -> o."""

    def __init__(self, hal: Backend, qkv: Linear, o_proj: Linear, num_heads: int, num_kv_heads: int,
                 head_dim: int, rotary: RotaryEmbedding, q_norm: RMSNorm | None = None,
                 k_norm: RMSNorm | None = None):
        self.hal, self.qkv, self.o_proj, self.rotary = hal, qkv, o_proj, rotary
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_norm, self.k_norm = q_norm, k_norm
        self.scale = head_dim ** -0.5
        # {"k_scale": .., "v_scale": ..} with an fp8 KV cache (set by the loader), else empty:
        # backends that never hold an fp8 cache need not take the arguments
        self.kv_scales: dict[str, float] = {}

    def __call__(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        q, k, v = self.qkv(x).split(self.qkv.split, dim=-1)
        # contiguous per-head views: kernels of every backend can take them as they are
        q = q.reshape(t, self.num_heads, d).contiguous()
        k = k.reshape(t, self.num_kv_heads, d).contiguous()
        v = v.reshape(t, self.num_kv_heads, d).contiguous()
        norm: dict = {}
        if self.q_norm is not None and self.q_norm.eps == self.k_norm.eps:  # Qwen3's: into the same op
            norm = dict(q_norm_weight=self.q_norm.weight, k_norm_weight=self.k_norm.weight, norm_eps=self.q_norm.eps)
        elif self.q_norm is not None:
            q = self.q_norm(q.view(-1, d)).view(t, self.num_heads, d)
            k = self.k_norm(k.view(-1, d)).view(t, self.num_kv_heads, d)
        # (q/k norm,) rotary and write_kv as one HAL op: one kernel launch (GPU) or C call
        # (CPU) where the backend fuses them, the ops one by one where it does not
        r = self.rotary
        self.hal.rotary_write_kv(positions, q, k, v, r.cos_sin_cache, r.is_neox, kv_cache, meta.slot_mapping,
                                 **self.kv_scales, **norm)
        out = self.hal.attention(q, kv_cache, meta, self.scale, **self.kv_scales)
        return self.o_proj(out.view(t, self.num_heads * d))


class MLP:
    """Gated MLP: down(silu(gate x) * up x), with gate and up fused into one GEMM."""

    def __init__(self, hal: Backend, gate_up: Linear, down: Linear):
        self.hal, self.gate_up, self.down = hal, gate_up, down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hal.silu_and_mul(self.gate_up(x)))


class MoE:
    """Router GEMM, then top-k routing and the expert MLPs in one ``hal.moe`` call.
    w13 is [E, 2I, H] (gate rows then up rows), w2 is [E, H, I]."""

    def __init__(self, hal: Backend, router: Linear, w13: torch.Tensor, w2: torch.Tensor,
                 spec: MoeSpec, scheme: str = "none"):
        self.hal, self.router, self.spec = hal, router, spec
        self.w13 = hal.pack_weight(w13, scheme)
        self.w2 = hal.pack_weight(w2, scheme)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.hal.moe(x, self.router(x), self.w13, self.w2, self.spec)
