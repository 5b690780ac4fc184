"""Checkpoint loading: config fields, errors a user can act on, MoE expert layouts on disk."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from halserve.errors import ModelLoadError
from halserve.hal.native import NativeBackend
from halserve.models.loader import load_config, load_model
from halserve.models.registry import supported_architectures
from tests.helpers.checkpoints import BOS_ID, EOS_ID, IM_END_ID, PRESETS


def copy_checkpoint(src, dst, skip=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    return dst


def test_model_config_fields(checkpoint):
    cfg = load_config(checkpoint("qwen3"))
    assert cfg.architecture == "Qwen3ForCausalLM"
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (2, 2, 32, 512)
    assert cfg.max_position_embeddings == 256 and cfg.dtype == torch.float32
    # config.json says eos 2; generation_config.json says [2, 4]: merged, in order
    assert cfg.eos_token_ids == [EOS_ID, IM_END_ID] and cfg.bos_token_id == BOS_ID
    assert cfg.sliding_window is None  # Qwen3 carries a window but use_sliding_window is off
    assert cfg.hf_config["head_dim"] == 32


def test_every_preset_architecture_is_registered():
    assert {arch for arch, _, _ in PRESETS.values()} <= set(supported_architectures())


def test_unknown_architecture(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"'FooForCausalLM' is not supported; supported: .*LlamaForCausalLM"):
        load_model(path, NativeBackend())


def test_missing_safetensors(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama"), tmp_path / "m", skip=["*.safetensors"])
    with pytest.raises(ModelLoadError, match=r"has no \*\.safetensors weight files"):
        load_model(path, NativeBackend())


def test_missing_shard(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("qwen2"), tmp_path / "m", skip=["model-00002-of-*"])
    with pytest.raises(ModelLoadError, match=r"names shard\(s\) that are missing: model-00002-of-"):
        load_model(path, NativeBackend())


def test_missing_tensor(checkpoint, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    src = checkpoint("llama")
    for f in ("config.json", "generation_config.json"):
        shutil.copy(src / f, path / f)
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(path, NativeBackend())


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_model(tmp_path / "nope", NativeBackend())
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path, NativeBackend())


def test_bad_dtype_and_quantization(checkpoint):
    path = checkpoint("llama")
    with pytest.raises(ModelLoadError, match="dtype 'float8' is not supported"):
        load_model(path, NativeBackend(), dtype="float8")
    with pytest.raises(ModelLoadError, match="quantization 'nf4' is not supported"):
        load_model(path, NativeBackend(), quantization="nf4")


@pytest.mark.parametrize("preset,transposed", [("qwen3_moe", False), ("mixtral", False), ("mixtral", True)])
def test_fused_expert_layout_on_disk(checkpoint, tmp_path, preset, transposed):
    """A checkpoint whose experts were saved fused ([E, 2I, H] / [E, H, I], or the older
    transposed layout) loads to the same model as the per-expert one."""
    src = checkpoint(preset)
    tensors = {}
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    cfg = json.loads((src / "config.json").read_text())
    gate, up, down = ("w1", "w3", "w2") if preset == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i in range(cfg["num_hidden_layers"]):
        old = f"model.layers.{i}." + ("block_sparse_moe.experts." if preset == "mixtral" else "mlp.experts.")
        new = f"model.layers.{i}.mlp.experts."
        if f"{old}0.{gate}.weight" not in tensors:  # a dense layer (Qwen3-MoE mlp_only_layers)
            continue
        n = cfg["num_local_experts"]
        w13 = torch.stack([torch.cat([tensors.pop(f"{old}{e}.{gate}.weight"), tensors.pop(f"{old}{e}.{up}.weight")])
                           for e in range(n)])
        w2 = torch.stack([tensors.pop(f"{old}{e}.{down}.weight") for e in range(n)])
        if transposed:
            w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        tensors[new + "gate_up_proj"], tensors[new + "down_proj"] = w13, w2
        if preset == "mixtral":
            tensors[f"model.layers.{i}.mlp.gate.weight"] = tensors.pop(f"model.layers.{i}.block_sparse_moe.gate.weight")
    path = copy_checkpoint(src, tmp_path / "fused", skip=["*.safetensors", "*.index.json"])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    hal = NativeBackend()
    ref_model, _ = load_model(src, hal)
    model, _ = load_model(path, hal)
    for a, b in zip(ref_model.layers, model.layers):
        if not hasattr(a.mlp, "w13"):
            continue
        assert torch.equal(a.mlp.w13.weight, b.mlp.w13.weight) and torch.equal(a.mlp.w2.weight, b.mlp.w2.weight)
        assert torch.equal(a.mlp.router.weight.weight, b.mlp.router.weight.weight)


def test_checkpoint_fingerprint_follows_content_not_path(tmp_path):
    import shutil

    from halserve.models.loader import checkpoint_fingerprint
    from tests.helpers.checkpoints import make_checkpoint

    a = make_checkpoint("llama", tmp_path / "a", seed=0)
    b = tmp_path / "elsewhere"
    shutil.copytree(a, b)
    c = make_checkpoint("llama", tmp_path / "c", seed=1)  # same shapes, other weights
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b)
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(c)


@pytest.mark.parametrize("preset", ["llama", "qwen3"])  # untied and tied lm_head
def test_quantize_lm_head(checkpoint, preset):
    """quantize_lm_head puts the output projection in the load's scheme: its logits are the
    dequantized weight's (float64 reference), not the checkpoint's, and the other layers are
    packed as without it. Off (the default), the lm_head keeps the model dtype."""
    from halserve.hal.quant import dequant
    from halserve.hal.reference import nmse

    path = checkpoint(preset)
    hal = NativeBackend()
    plain, _ = load_model(path, hal, quantization="int8")
    quant, _ = load_model(path, hal, quantization="int8", quantize_lm_head=True)
    assert plain.lm_head.weight.scheme == "none" and quant.lm_head.weight.scheme == "int8"
    assert quant.layers[0].mlp.down.weight.scheme == plain.layers[0].mlp.down.weight.scheme == "int8"
    h = torch.randn(5, plain.lm_head.weight.in_features, generator=torch.Generator().manual_seed(0))
    w_ref = plain.lm_head.weight.weight.double()
    ours, ref = quant.lm_head(h), h.double() @ dequant(quant.lm_head.weight, torch.float64).T
    assert nmse(ours, ref) < 1e-10
    err = nmse(ours, h.double() @ w_ref.T)  # int8 rounding of the weight shows in the logits
    assert 1e-8 < err < 1e-3


def test_quantize_lm_head_needs_a_scheme(checkpoint):
    from halserve.config import ConfigError, EngineConfig

    with pytest.raises(ModelLoadError, match="quantize_lm_head needs a quantization"):
        load_model(checkpoint("llama"), NativeBackend(), quantize_lm_head=True)
    with pytest.raises(ConfigError, match="quantize_lm_head=True needs a quantization"):
        EngineConfig(model="m", quantize_lm_head=True)
    with pytest.raises(ConfigError, match="must be true or false"):
        EngineConfig(model="m", quantization="int8", quantize_lm_head="yes")
