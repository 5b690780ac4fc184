"""Llama family decoder: Llama (1-3.x), Mistral, Qwen2, and the base of Qwen3 and the MoE models.

Pre-norm decoder layers (RMSNorm -> attention -> RMSNorm -> MLP) with the residual add fused
into the norms. Biases are loaded wherever the checkpoint has them (Qwen2's q/k/v bias,
Llama's ``attention_bias`` / ``mlp_bias``), so one class serves all three.

A model is built from ``(hf_config: dict, hal, weights)``; ``weights`` is the loader's lazy
checkpoint view (``get``, ``maybe``, ``first``, ``experts``, ``scheme``, ``device``).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from halserve.errors import ModelLoadError
from halserve.hal.interface import AttentionMetadata, Backend
from halserve.models.checks import configured_window
from halserve.models.layers import MLP, Attention, Embedding, Linear, RMSNorm, RotaryEmbedding


def head_dim_of(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def make_rotary(cfg: dict, hal: Backend, device) -> RotaryEmbedding:
    from halserve.hal.rope import rope_params_from_hf_config

    base, scaling = rope_params_from_hf_config(cfg)
    head_dim = head_dim_of(cfg)  # the whole head rotates: checks.py refuses partial_rotary_factor
    try:
        return RotaryEmbedding(hal, head_dim, head_dim, cfg["max_position_embeddings"],
                               base, scaling, is_neox=True, device=device)
    except (ValueError, KeyError) as e:  # an unknown rope type, a missing rope parameter
        what = f"rope parameter {e} is missing" if isinstance(e, KeyError) else str(e)
        raise ModelLoadError(f"{(cfg.get('architectures') or ['model'])[0]}: {what}") from None


class LlamaDecoderLayer:
    def __init__(self, cfg: dict, hal: Backend, w, prefix: str, rotary: RotaryEmbedding, mlp,
                 qk_norm: bool = False):
        eps, d = cfg["rms_norm_eps"], head_dim_of(cfg)
        a = prefix + "self_attn."
        qkv = Linear(hal, [w.get(a + f"{n}_proj.weight") for n in "qkv"],
                     [w.maybe(a + f"{n}_proj.bias") for n in "qkv"], w.scheme)
        o_proj = Linear(hal, w.get(a + "o_proj.weight"), w.maybe(a + "o_proj.bias"), w.scheme)
        q_norm = RMSNorm(hal, w.get(a + "q_norm.weight"), eps) if qk_norm else None
        k_norm = RMSNorm(hal, w.get(a + "k_norm.weight"), eps) if qk_norm else None
        self.self_attn = Attention(hal, qkv, o_proj, cfg["num_attention_heads"],
                                   cfg.get("num_key_value_heads") or cfg["num_attention_heads"], d,
                                   rotary, q_norm, k_norm)
        self.input_layernorm = RMSNorm(hal, w.get(prefix + "input_layernorm.weight"), eps)
        self.post_attention_layernorm = RMSNorm(hal, w.get(prefix + "post_attention_layernorm.weight"), eps)
        self.mlp = mlp

    def __call__(self, positions, h, residual, kv_cache, meta):
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM:
    qk_norm = False  # Qwen3 sets it: per-head RMSNorm on q and k before rotary

    def __init__(self, cfg: dict, hal: Backend, w):
        self.hal = hal
        self.embed_tokens = Embedding(w.get("model.embed_tokens.weight"))
        rotary = make_rotary(cfg, hal, w.device)
        self.layers = [
            LlamaDecoderLayer(cfg, hal, w, f"model.layers.{i}.", rotary,
                              self.make_mlp(cfg, hal, w, i, f"model.layers.{i}.mlp."), self.qk_norm)
            for i in range(cfg["num_hidden_layers"])
        ]
        self.layer_windows = layer_windows(cfg)
        self.norm = RMSNorm(hal, w.get("model.norm.weight"), cfg["rms_norm_eps"])
        if cfg.get("tie_word_embeddings"):
            w.maybe("lm_head.weight")  # some tied checkpoints store a copy: mark it used
            lm_head = self.embed_tokens.weight
        else:
            lm_head = w.get("lm_head.weight")
        # logits from the unquantized lm_head, as in vLLM, unless quantize_lm_head asked for the scheme
        self.lm_head = Linear(hal, lm_head, scheme=w.lm_head_scheme)

    def make_mlp(self, cfg: dict, hal: Backend, w, layer: int, prefix: str):
        return dense_mlp(hal, w, prefix)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        metas = {w: meta if w == meta.sliding_window else replace(meta, sliding_window=w)
                 for w in set(self.layer_windows)} if meta.sliding_window is not None else None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            h, residual = layer(positions, h, residual, kv_cache,
                                meta if metas is None else metas[self.layer_windows[i]])
        h, _ = self.norm(h, residual)
        return h

    __call__ = forward

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def layer_windows(cfg: dict) -> list[int | None]:
    """Each layer's attention window (None: full), as transformers decides it. Qwen2/Qwen3
    window only the layers from ``max_window_layers`` on, or those ``layer_types`` names
    "sliding_attention"; other families window every layer."""
    n = cfg["num_hidden_layers"]
    window = configured_window(cfg)
    if window is None:
        return [None] * n
    if (cfg.get("architectures") or [""])[0] not in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        return [window] * n
    types = cfg.get("layer_types")
    if types:
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
        return [window if t == "sliding_attention" else None for t in types]
    first = cfg.get("max_window_layers", 28)
    return [window if i >= first else None for i in range(n)]


def dense_mlp(hal: Backend, w, prefix: str) -> MLP:
    gate_up = Linear(hal, [w.get(prefix + "gate_proj.weight"), w.get(prefix + "up_proj.weight")],
                     [w.maybe(prefix + "gate_proj.bias"), w.maybe(prefix + "up_proj.bias")], w.scheme)
    down = Linear(hal, w.get(prefix + "down_proj.weight"), w.maybe(prefix + "down_proj.bias"), w.scheme)
    return MLP(hal, gate_up, down)
