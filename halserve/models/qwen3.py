"""Qwen3 dense: the Llama decoder plus per-head RMSNorm on q and k before rotary
(and an explicit ``head_dim`` that may differ from hidden_size / num_heads)."""
from __future__ import annotations

from halserve.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
