"""EAGLE draft heads (EAGLE-1/2, the checkpoint format vLLM's ``EagleLlamaForCausalLM`` reads).

A head is a separate checkpoint directory: a Llama ``config.json`` (hidden size, heads, MLP
size, ``num_hidden_layers`` usually 1) and safetensors with ``fc.weight`` [H, 2H] (``fc.bias``
optional) and the decoder layer(s) ``layers.N.*``; the names may carry a ``model.`` prefix.
``embed_tokens``, ``lm_head`` and a final ``norm`` are optional: without them the head uses
the target's embedding and LM head, and no final norm (EAGLE-1 has none).

At position p the head reads the target's last hidden state h_p (after its final norm) and
the embedding of token p+1:  x = fc(cat(embed(t_{p+1}), h_p)), then the decoder layers with
layer 0's input norm left out (its input is already a mix of two normed features), and the
output is that layer's output plus its residual. The logits of that output predict token
p+2; the output itself stands in for h_{p+1} when the head drafts further. A HASS-style head
(``add_para_norm``) normalises the embedding and the hidden state before ``fc``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from halserve.errors import ModelLoadError
from halserve.hal.interface import AttentionMetadata, Backend
from halserve.models.layers import Embedding, Linear, RMSNorm
from halserve.models.llama import LlamaDecoderLayer, dense_mlp, head_dim_of, make_rotary

# config.json architectures an EAGLE-1/2 head is saved under
EAGLE_ARCHITECTURES = ("LlamaForCausalLM", "EagleLlamaForCausalLM", "EAGLEModel", "EagleModel")


class _HeadWeights:
    """The loader's ``Weights`` seen through the head's name prefix (``model.`` or none).
    Layer 0's input norm is not part of a head: asking for it gives None (and a checkpoint
    that stores one anyway has it marked used, not warned about)."""

    def __init__(self, w, prefix: str):
        self.w, self.prefix, self.scheme, self.device = w, prefix, w.scheme, w.device

    def __contains__(self, name: str) -> bool:
        return self.prefix + name in self.w

    def get(self, name: str) -> torch.Tensor | None:
        if name == "layers.0.input_layernorm.weight":
            self.w.maybe(self.prefix + name)
            return None
        return self.w.get(self.prefix + name)

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self else None


class EagleHead:
    def __init__(self, path: str, hal: Backend, target, target_config, dtype: torch.dtype):
        from halserve.models.loader import Weights, _weight_files

        root = Path(path)
        cfg_file = root / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"EAGLE head {str(path)!r} has no config.json (expected a directory with a "
                                 "Llama config.json and safetensors holding fc.weight and layers.0.*)")
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        arch = (cfg.get("architectures") or ["EagleLlamaForCausalLM"])[0]
        if "eagle3" in arch.lower():
            raise ModelLoadError(f"{root}: {arch} is an EAGLE-3 head (it reads several target layers); "
                                 "only EAGLE-1/2 heads (method 'eagle') are supported")
        if arch not in EAGLE_ARCHITECTURES:
            raise ModelLoadError(f"{root}: architecture {arch!r} is not an EAGLE-1/2 Llama head; "
                                 f"expected one of {', '.join(EAGLE_ARCHITECTURES)}")
        tcfg = target_config.hf_config
        # a head's config may leave out what it shares with its target
        for key in ("rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters"):
            if key not in cfg and key in tcfg:
                cfg[key] = tcfg[key]
        if cfg.get("vocab_size", target_config.vocab_size) != target_config.vocab_size:
            raise ModelLoadError(f"EAGLE head {root} has vocab_size {cfg['vocab_size']}; the target's is "
                                 f"{target_config.vocab_size}")
        if cfg["hidden_size"] != tcfg["hidden_size"]:
            raise ModelLoadError(f"EAGLE head {root} has hidden_size {cfg['hidden_size']}; the target's is "
                                 f"{tcfg['hidden_size']} (a head is trained for one target)")
        w = Weights(root, _weight_files(root), dtype, hal.device or "cpu", "none")
        prefix = "model." if "model.fc.weight" in w else ""
        hw = _HeadWeights(w, prefix)
        if "fc.weight" not in hw:
            raise ModelLoadError(f"EAGLE head {root} lacks fc.weight (an EAGLE-1/2 head maps "
                                 "cat(embedding, hidden) [2H] to H)")
        eps, h = cfg["rms_norm_eps"], cfg["hidden_size"]
        if not isinstance(cfg.get("num_hidden_layers"), int) or cfg["num_hidden_layers"] < 1:
            raise ModelLoadError(f"EAGLE head {root}: num_hidden_layers={cfg.get('num_hidden_layers')!r}; "
                                 "a head has at least one decoder layer")
        self.hal = hal
        with torch.inference_mode():
            fc = hw.get("fc.weight")
            if tuple(fc.shape) != (h, 2 * h):
                raise ModelLoadError(f"EAGLE head {root}: fc.weight is {list(fc.shape)}; an EAGLE-1/2 head's is "
                                     f"[{h}, {2 * h}] (hidden size H from cat(embedding, hidden) [2H])")
            self.fc = Linear(hal, fc, hw.maybe("fc.bias"))
            self.embed_tokens = Embedding(hw.get("embed_tokens.weight")) if "embed_tokens.weight" in hw \
                else target.embed_tokens
            if cfg.get("add_para_norm"):
                self.para_norms = (RMSNorm(hal, hw.get("embedding_layernorm.weight"), eps),
                                   RMSNorm(hal, hw.get("hidden_states_layernorm.weight"), eps))
            else:
                self.para_norms = None
            rotary = make_rotary(cfg, hal, w.device)
            self.layers = [LlamaDecoderLayer(cfg, hal, hw, f"layers.{i}.", rotary,
                                             dense_mlp(hal, hw, f"layers.{i}.mlp."))
                           for i in range(cfg["num_hidden_layers"])]
            self.norm = RMSNorm(hal, hw.get("norm.weight"), eps) if "norm.weight" in hw else None
            self.lm_head = Linear(hal, hw.get("lm_head.weight")) if "lm_head.weight" in hw else target.lm_head
        unused = w.unused()
        if unused:
            raise ModelLoadError(f"EAGLE head {root} has tensors no EAGLE-1/2 head reads, e.g. {unused[:3]} "
                                 "(another head format?)")
        self.num_layers = len(self.layers)
        self.num_kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        self.head_dim = head_dim_of(cfg)
        self.max_position_embeddings = cfg["max_position_embeddings"]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(the output fed back as the next position's hidden state, the one to take logits of)."""
        e = self.embed_tokens(input_ids)
        if self.para_norms is not None:
            e, hidden = self.para_norms[0](e), self.para_norms[1](hidden)
        x = self.fc(torch.cat((e, hidden.to(e.dtype)), dim=-1))
        first = self.layers[0]
        residual = x
        h = first.self_attn(positions, x, kv_caches[0], meta)
        h, residual = first.post_attention_layernorm(h, residual)
        h = first.mlp(h)
        for layer, kv in zip(self.layers[1:], kv_caches[1:]):
            h, residual = layer(positions, h, residual, kv, meta)
        out = h + residual
        return out, (out if self.norm is None else self.norm(h, residual)[0])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
