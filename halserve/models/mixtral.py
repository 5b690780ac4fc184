"""Mixtral: the Llama decoder with a sparse MoE block (softmax top-k, renormalised) in
place of the MLP. Experts are ``block_sparse_moe.experts.{e}.w1/w3/w2`` on disk."""
from __future__ import annotations

from halserve.hal.interface import Backend, MoeSpec
from halserve.models.layers import Linear, MoE
from halserve.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    def make_mlp(self, cfg: dict, hal: Backend, w, layer: int, prefix: str):
        p = f"model.layers.{layer}."
        # transformers 5 keeps per-expert tensors on disk but fuses them under `mlp.` in
        # memory; accept a checkpoint saved either way
        router = Linear(hal, w.get(w.first(p + "block_sparse_moe.gate.weight", p + "mlp.gate.weight")))
        w13, w2 = w.experts([p + "block_sparse_moe.experts.", p + "mlp.experts."], ("w1", "w3", "w2"),
                            cfg["num_local_experts"], cfg["hidden_size"])
        return MoE(hal, router, w13, w2, MoeSpec(top_k=cfg["num_experts_per_tok"], renormalize=True), w.scheme)
