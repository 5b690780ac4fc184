"""Config variants of every supported family, the way a user's model zoo varies them: rope
scaling types and thetas, head_dim != hidden/heads, biases, GQA ratios, odd sizes, windows,
MoE routing options, activations, eps. Each tiny checkpoint (transformers saves it) must decode
greedily (float32) token-exact like transformers' own ``generate``, on native and cpu_amx, with
prompts of different lengths in one batch; or the loader refuses it naming the option."""
from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from halserve import LLM, SamplingParams
from halserve.errors import ModelLoadError
from halserve.hal.cpu_amx.backend import CpuAmxBackend

NEW_TOKENS = 14
PROMPT_LENS = (24, 17, 29)
BACKENDS = ["native", pytest.param("cpu_amx", marks=pytest.mark.skipif(
    CpuAmxBackend.probe().score <= 0, reason="cpu_amx cannot run on this CPU"))]

_L3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
           original_max_position_embeddings=16)


def _rope(kind: str, theta: float = 10000.0, **kw) -> dict:
    return {"rope_parameters": dict(rope_type=kind, rope_theta=theta, **kw)}


def V(preset: str, edit: dict | None = None, engine: dict | None = None, **overrides):
    """A variant: ``overrides`` go to the transformers config that saves the checkpoint; ``edit``
    rewrites config.json afterwards (None deletes a key): the forms transformers loads but no
    longer writes (transformers 4's ``rope_scaling``); ``engine`` are extra LLM arguments."""
    return preset, overrides, edit or {}, engine or {}


_LONG = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.15 * i for i in range(8)],
             long_factor=[3.0 + 0.1 * i for i in range(8)], original_max_position_embeddings=256)

VARIANTS: dict[str, tuple[str, dict, dict, dict]] = {
    # rope
    "llama_theta_500k": V("llama", **_rope("default", 500000.0)),
    "llama_theta_100": V("llama", **_rope("default", 100.0)),
    "llama_linear": V("llama", **_rope("linear", factor=4.0)),
    "llama_dynamic": V("llama", **_rope("dynamic", factor=2.0)),
    "llama_dynamic_odd_factor_mpe": V("llama", max_position_embeddings=200, **_rope("dynamic", factor=1.7)),
    "llama_yarn": V("llama", **_rope("yarn", factor=4.0, original_max_position_embeddings=32)),
    "llama_yarn_attn_factor_no_truncate": V("llama", **_rope(
        "yarn", factor=4.0, original_max_position_embeddings=32, attention_factor=0.8, beta_fast=16.0,
        beta_slow=2.0, truncate=False)),
    "llama_yarn_mscale": V("llama", **_rope("yarn", factor=4.0, original_max_position_embeddings=32, mscale=0.9,
                                            mscale_all_dim=0.7)),
    "llama_yarn_toplevel_original_max": V("llama", edit=dict(original_max_position_embeddings=16), **_rope(
        "yarn", factor=4.0, original_max_position_embeddings=64)),
    "llama3_rope": V("llama", rope_parameters=dict(_L3, rope_theta=50000.0)),
    "llama3_rope_wide_band": V("llama", rope_parameters=dict(_L3, low_freq_factor=2.0, high_freq_factor=8.0,
                                                             original_max_position_embeddings=64, factor=16.0)),
    "llama_longrope_short_range": V("llama", rope_parameters=_LONG),
    "llama_longrope_factor": V("llama", rope_parameters=dict(_LONG, factor=4.0)),
    "llama_legacy_rope_scaling_linear": V("llama", edit=dict(
        rope_parameters=None, rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 3.0})),
    "qwen2_legacy_rope_scaling_yarn": V("qwen2", edit=dict(rope_parameters=None, rope_theta=1e6, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral_yarn": V("mistral", sliding_window=None, **_rope("yarn", 20000.0, factor=2.0,
                                                              original_max_position_embeddings=64)),
    "qwen2_linear": V("qwen2", **_rope("linear", 1000000.0, factor=2.0)),
    "qwen3_yarn": V("qwen3", **_rope("yarn", factor=4.0, original_max_position_embeddings=32)),
    "qwen3_dynamic": V("qwen3", **_rope("dynamic", 5000.0, factor=3.0)),
    "mixtral_llama3": V("mixtral", rope_parameters=dict(_L3, rope_theta=1e6)),
    "qwen3_moe_yarn": V("qwen3_moe", **_rope("yarn", factor=2.0, original_max_position_embeddings=64)),
    # shapes
    "llama_head_dim_32": V("llama", head_dim=32),
    "mistral_head_dim_8_mha": V("mistral", head_dim=8, num_key_value_heads=4, sliding_window=None),
    "qwen2_head_dim_32_tied": V("qwen2", head_dim=32, tie_word_embeddings=True),
    "llama_head_dim_24": V("llama", head_dim=24),
    "qwen3_head_dim_40_mha": V("qwen3", head_dim=40, num_key_value_heads=4),
    "mistral_head_dim_80": V("mistral", head_dim=80, sliding_window=None),
    "qwen2_hidden_72_heads_6": V("qwen2", hidden_size=72, num_attention_heads=6, num_key_value_heads=3,
                                 intermediate_size=100),
    "llama_hidden_96_heads_12_kv_4": V("llama", hidden_size=96, num_attention_heads=12, num_key_value_heads=4,
                                       intermediate_size=200, vocab_size=448),
    "mixtral_hidden_80_inter_72": V("mixtral", hidden_size=80, intermediate_size=72, num_attention_heads=5,
                                    num_key_value_heads=1),
    "qwen3_head_dim_128": V("qwen3", head_dim=128),
    "llama_head_dim_256_mqa": V("llama", head_dim=256, num_key_value_heads=1),
    "mistral_head_dim_96": V("mistral", head_dim=96, sliding_window=10, engine=dict(max_num_batched_tokens=9)),
    "qwen2_head_dim_112": V("qwen2", head_dim=112),
    "llama_head_dim_6": V("llama", head_dim=6),
    "mixtral_head_dim_32": V("mixtral", head_dim=32),
    "qwen3_moe_attention_bias_tied": V("qwen3_moe", attention_bias=True, tie_word_embeddings=True),
    "llama_biases": V("llama", attention_bias=True, mlp_bias=True),
    "llama_attention_bias_only": V("llama", attention_bias=True),
    "qwen3_attention_bias": V("qwen3", attention_bias=True),
    "llama_kv_heads_absent": V("llama", num_key_value_heads=4, edit=dict(num_key_value_heads=None)),
    "mistral_head_dim_null": V("mistral", edit=dict(head_dim=None)),
    # a window but no use_sliding_window key: Qwen's configs default it to false (no window)
    "qwen2_window_without_use_key": V("qwen2", edit=dict(sliding_window=8, max_window_layers=0, use_sliding_window=None, layer_types=None)),
    "qwen3_window_without_use_key": V("qwen3", edit=dict(sliding_window=8, max_window_layers=0, use_sliding_window=None, layer_types=None)),
    "llama_mqa": V("llama", num_key_value_heads=1),
    "llama_mha": V("llama", num_key_value_heads=4),
    "qwen3_gqa_8_to_2": V("qwen3", num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    "llama_odd_sizes": V("llama", intermediate_size=100, vocab_size=500),
    "qwen3_moe_odd_sizes": V("qwen3_moe", moe_intermediate_size=20, intermediate_size=100, vocab_size=510),
    "llama_eps_1e-2": V("llama", rms_norm_eps=1e-2),
    "qwen3_eps_1e-3": V("qwen3", rms_norm_eps=1e-3),
    "llama_swish": V("llama", hidden_act="swish"),
    # windows (chunked prefill crossing the window: a small token budget per step)
    "mistral_window_8_chunked": V("mistral", sliding_window=8, engine=dict(max_num_batched_tokens=8)),
    "mistral_window_12_gqa": V("mistral", sliding_window=12, num_key_value_heads=2,
                               engine=dict(max_num_batched_tokens=16)),
    "mixtral_window_8": V("mixtral", sliding_window=8, engine=dict(max_num_batched_tokens=12)),
    "qwen2_max_window_layers": V("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                 engine=dict(max_num_batched_tokens=8)),
    "qwen3_max_window_layers_0": V("qwen3", use_sliding_window=True, sliding_window=6, max_window_layers=0,
                                   engine=dict(max_num_batched_tokens=10)),
    "mistral_window_4_chunk_5": V("mistral", sliding_window=4, engine=dict(max_num_batched_tokens=5)),
    "mistral_window_20_chunk_7": V("mistral", sliding_window=20, num_key_value_heads=4,
                                   engine=dict(max_num_batched_tokens=7)),
    "qwen3_moe_window_all_layers": V("qwen3_moe", use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                     engine=dict(max_num_batched_tokens=8)),
    "qwen2_window_unused": V("qwen2", use_sliding_window=False, sliding_window=4),
    # moe
    "mixtral_top1": V("mixtral", num_experts_per_tok=1),
    "mixtral_top3": V("mixtral", num_experts_per_tok=3),
    "mixtral_8_experts_top2": V("mixtral", num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe_16_top8_norm": V("qwen3_moe", num_experts=16, num_experts_per_tok=8, norm_topk_prob=True),
    "qwen3_moe_step_3_all_dense": V("qwen3_moe", decoder_sparse_step=3, mlp_only_layers=[]),
    "qwen3_moe_norm_topk": V("qwen3_moe", norm_topk_prob=True, mlp_only_layers=[]),
    "qwen3_moe_sparse_step_2": V("qwen3_moe", decoder_sparse_step=2, mlp_only_layers=[]),
    "qwen3_moe_top4_mlp_only_1": V("qwen3_moe", num_experts_per_tok=4, mlp_only_layers=[1]),
}


@pytest.fixture(scope="module")
def variant_path(checkpoint, tmp_path_factory):
    """variant id -> its checkpoint directory (config.json edited where the variant says)."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            preset, overrides, edit, _ = VARIANTS[variant]
            path = checkpoint(preset, **overrides)
            cache[variant] = _edited(path, tmp_path_factory.mktemp(variant), edit) if edit else path
        return cache[variant]

    return get


def _edited(src: Path, dst: Path, edit: dict, gen_edit: dict | None = None) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for name, changes in (("config.json", edit), ("generation_config.json", gen_edit or {})):
        cfg = json.loads((dst / name).read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / name).write_text(json.dumps(cfg))
    return dst


@functools.lru_cache(maxsize=None)
def _hf_greedy(path: str) -> tuple[tuple[int, ...], ...]:
    """transformers' own greedy generate, one prompt at a time (no padding in play)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts(path):
            x = torch.tensor([ids])
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out.append(tuple(g[0, len(ids):].tolist()))
    return tuple(out)


def prompts(path) -> list[list[int]]:
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(7)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _ours(path, backend: str, **engine) -> list[list[int]]:
    llm = LLM(str(path), dtype="float32", backend=backend, enforce_eager=True, max_num_seqs=4, **engine)
    assert llm.engine.hal.name == backend
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    return [o.outputs[0].token_ids for o in llm.generate(prompts(path), sp)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_transformers(variant_path, variant, backend, caplog):
    path = variant_path(variant)
    ref = _hf_greedy(str(path))
    with caplog.at_level(logging.WARNING, logger="halserve.models.loader"):
        got = _ours(path, backend, **VARIANTS[variant][3])
    assert not [r for r in caplog.records if r.name == "halserve.models.loader"], "checkpoint tensors left unused"
    assert [tuple(t) for t in got] == list(ref)
    assert len({t for seq in ref for t in seq}) > 3, "degenerate checkpoint: greedy barely varies"


# id -> (preset, config overrides, config.json edit, words the one-line ModelLoadError must hold)
REFUSED: dict[str, tuple[str, dict, dict, tuple[str, ...]]] = {
    "llama_gelu": ("llama", dict(hidden_act="gelu"), {}, ("hidden_act='gelu'", "silu")),
    "qwen3_gelu_tanh": ("qwen3", dict(hidden_act="gelu_pytorch_tanh"), {}, ("hidden_act='gelu_pytorch_tanh'",)),
    "mixtral_relu": ("mixtral", dict(hidden_act="relu"), {}, ("hidden_act='relu'",)),
    "llama_partial_rotary": ("llama", dict(partial_rotary_factor=0.5), {}, ("partial_rotary_factor=0.5",)),
    "qwen2_partial_rotary_legacy": ("qwen2", {}, dict(rope_parameters=None, partial_rotary_factor=0.25,
                                                      rope_theta=1e4), ("partial_rotary_factor=0.25",)),
    "llama_attn_softcap": ("llama", dict(attn_logit_softcapping=30.0), {}, ("attn_logit_softcapping=30.0",)),
    "qwen2_final_softcap": ("qwen2", {}, dict(final_logit_softcapping=5.0), ("final_logit_softcapping=5.0",)),
    "llama_query_pre_attn_scalar": ("llama", {}, dict(query_pre_attn_scalar=144), ("query_pre_attn_scalar=144",)),
    "mistral_logits_scaling": ("mistral", {}, dict(logits_scaling=8.0), ("logits_scaling=8.0", "1.0")),
    "qwen2_rope_per_layer_type": ("qwen2", {}, dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), ("rope_parameters differing",)),
    "llama_sliding_window": ("llama", dict(sliding_window=8), {}, ("sliding_window=8", "LlamaForCausalLM")),
    "llama_unknown_rope_type": ("llama", {}, dict(rope_parameters={"rope_type": "su", "rope_theta": 1e4,
                                                                   "factor": 2.0}), ("'su'", "yarn")),
    "llama_rope_missing_factor": ("llama", {}, dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}),
                                  ("factor",)),
    "llama_longrope_past_original": ("llama", dict(rope_parameters=dict(_LONG, original_max_position_embeddings=32)),
                                     {}, ("longrope", "original_max_position_embeddings=32")),
    "mixtral_top5_of_4": ("mixtral", dict(num_experts_per_tok=5), {}, ("num_experts_per_tok=5", "num_local_experts")),
    "qwen3_moe_top0": ("qwen3_moe", {}, dict(num_experts_per_tok=0), ("num_experts_per_tok=0", "1..num_local_experts (8)")),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_option_refused_by_name(checkpoint, tmp_path, case):
    from halserve.hal.native import NativeBackend
    from halserve.models.loader import load_model

    preset, overrides, edit, words = REFUSED[case]
    path = checkpoint(preset, **overrides)
    if edit:
        path = _edited(path, tmp_path, edit)
    with pytest.raises(ModelLoadError) as e:
        load_model(path, NativeBackend())
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_context_past_max_position_embeddings(checkpoint):
    """A model's positions end at max_position_embeddings: a longer prompt (or max_model_len) is
    refused naming the limit, and a decode that reaches it stops there ("length"), its tokens
    so far transformers' own."""
    path = checkpoint("llama", max_position_embeddings=32)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        LLM(str(path), dtype="float32", backend="native", enforce_eager=True, max_model_len=64)
    llm = LLM(str(path), dtype="float32", backend="native", enforce_eager=True, max_num_seqs=4)
    long_prompt = list(range(5, 45))
    with pytest.raises(ValueError, match="max_model_len is 32"):
        llm.generate([long_prompt], SamplingParams(temperature=0.0, max_tokens=4))
    ref = _hf_greedy(str(path))
    outs = llm.generate(prompts(path), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    assert [o.outputs[0].token_ids for o in outs] == [list(r[:32 - n]) for n, r in zip(PROMPT_LENS, ref)]
    assert {o.outputs[0].finish_reason for o in outs} == {"length"}
    assert any(n + NEW_TOKENS > 32 for n in PROMPT_LENS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bos_eos_lists(checkpoint, tmp_path, backend):
    """eos_token_id (and bos_token_id) as lists in config.json and generation_config.json: decode
    stops at whichever eos comes first, where transformers' generate stops."""
    from halserve.models.loader import load_config

    base = checkpoint("llama")
    stop = _hf_greedy(str(base))[0][5]  # a token greedy decode reaches: the run must stop on it
    ids = {"eos_token_id": [2, stop]}  # (transformers' configs take no bos list; generation_config does)
    path = _edited(base, tmp_path / "ckpt", {**ids, "bos_token_id": None}, {**ids, "bos_token_id": [1, 3]})
    cfg = load_config(path)
    assert cfg.eos_token_ids == [2, stop] and cfg.bos_token_id == 1
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for p in prompts(path):
            x = torch.tensor([p])
            g = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=0)
            refs.append(g[0, len(p):].tolist())
    llm = LLM(str(path), dtype="float32", backend=backend, enforce_eager=True, max_num_seqs=4)
    outs = llm.generate(prompts(path), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert refs[0][-1] == stop and len(refs[0]) <= 6
