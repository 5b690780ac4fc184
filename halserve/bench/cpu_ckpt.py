"""Random-weight checkpoints for ``halserve bench cpu``'s larger shapes (a Llama of any
shape and layer count, a Qwen3-MoE), written fast enough for a timed device run.

Speed, not statistics, is what these measure, so every tensor is a window into one
N(0, 0.02) pool at a random offset (a fresh ``randn`` per tensor is single-threaded and
takes minutes at 8B). Tensors are distinct memory, so nothing benefits from caching."""
from __future__ import annotations

import json
import time
from pathlib import Path

_POOL = 1 << 24


def llama_tensors(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
                  intermediate_size: int, vocab_size: int, head_dim: int | None = None, num_experts: int = 0,
                  moe_intermediate_size: int = 0, qk_norm: bool = False, **_) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a Llama (``num_experts`` 0) or Qwen3-MoE (every layer sparse)."""
    hd = head_dim or hidden_size // num_attention_heads
    q, kv = num_attention_heads * hd, num_key_value_heads * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, hidden_size)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (hidden_size,), p + "post_attention_layernorm.weight": (hidden_size,),
                    p + "self_attn.q_proj.weight": (q, hidden_size), p + "self_attn.k_proj.weight": (kv, hidden_size),
                    p + "self_attn.v_proj.weight": (kv, hidden_size), p + "self_attn.o_proj.weight": (hidden_size, q)})
        if qk_norm:
            out.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if num_experts:
            out[p + "mlp.gate.weight"] = (num_experts, hidden_size)
            for e in range(num_experts):
                ep = f"{p}mlp.experts.{e}."
                out.update({ep + "gate_proj.weight": (moe_intermediate_size, hidden_size),
                            ep + "up_proj.weight": (moe_intermediate_size, hidden_size),
                            ep + "down_proj.weight": (hidden_size, moe_intermediate_size)})
        else:
            out.update({p + "mlp.gate_proj.weight": (intermediate_size, hidden_size),
                        p + "mlp.up_proj.weight": (intermediate_size, hidden_size),
                        p + "mlp.down_proj.weight": (hidden_size, intermediate_size)})
    out["model.norm.weight"] = (hidden_size,)
    out["lm_head.weight"] = (vocab_size, hidden_size)
    return out


def config_for(shape: dict) -> dict:
    base = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "bfloat16", "attention_bias": False, "initializer_range": 0.02}
    if shape.get("num_experts"):
        return {**base, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "rope_theta": 1e6,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                **{k: v for k, v in shape.items() if k != "qk_norm"}}
    return {**base, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 500000.0,
            "mlp_bias": False, **shape}


def write_random(path: Path, shape: dict, seed: int = 0, shard_bytes: int = 2 << 30) -> Path:
    """Write config.json + sharded bf16 safetensors for ``shape`` (once: an existing one is kept)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        return path
    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 * _POOL, generator=g).mul_(0.02).to(torch.bfloat16)
    shapes = llama_tensors(**shape)
    shards: list[dict] = [{}]
    size = 0
    for name, s in shapes.items():
        n = 1
        for d in s:
            n *= d
        if name.endswith("norm.weight"):
            t = torch.ones(s, dtype=torch.bfloat16)
        else:
            t = torch.empty(n, dtype=torch.bfloat16)
            offs = torch.randint(0, _POOL, (-(-n // _POOL),), generator=g).tolist()
            for i, o in enumerate(offs):
                m = min(_POOL, n - i * _POOL)
                t[i * _POOL:i * _POOL + m] = pool[o:o + m]
            t = t.view(s)
        if size + 2 * n > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += 2 * n
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
        shards[i] = {}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config_for(shape), indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    print(f"  wrote {total / 1e9:.1f} GB random checkpoint {path} in {time.perf_counter() - t0:.1f}s", flush=True)
    return path
