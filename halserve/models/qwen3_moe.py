"""Qwen3-MoE: Qwen3 attention (q/k norm) with sparse MoE blocks; layers listed in
``mlp_only_layers`` or off the ``decoder_sparse_step`` grid keep a dense MLP."""
from __future__ import annotations

from halserve.hal.interface import Backend, MoeSpec
from halserve.models.layers import Linear, MoE
from halserve.models.llama import dense_mlp
from halserve.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def make_mlp(self, cfg: dict, hal: Backend, w, layer: int, prefix: str):
        num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        step = cfg.get("decoder_sparse_step", 1) or 1
        if num_experts == 0 or layer in (cfg.get("mlp_only_layers") or []) or (layer + 1) % step:
            return dense_mlp(hal, w, prefix)
        router = Linear(hal, w.get(prefix + "gate.weight"))
        w13, w2 = w.experts([prefix + "experts."], ("gate_proj", "up_proj", "down_proj"), num_experts,
                            cfg["hidden_size"])
        spec = MoeSpec(top_k=cfg["num_experts_per_tok"], renormalize=bool(cfg.get("norm_topk_prob", False)))
        return MoE(hal, router, w13, w2, spec, w.scheme)
