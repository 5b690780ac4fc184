"""Tiny seeded random checkpoints, written by transformers itself, for every supported family.

``make_checkpoint(arch, path)`` builds a small model from a fixed config, perturbs the norm
weights and biases away from their trivial init (ones / zeros) so that a layer that skips
them shows up as a mismatch, and saves it with ``save_pretrained(safe_serialization=True)``
together with a small byte-level BPE tokenizer and a generation config. Nothing is
downloaded.

``arch`` is a preset name from ``PRESETS`` or an HF architecture name (its default preset).
"""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = Path(__file__).with_name("corpus.txt")
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, initializer_range=0.1,  # large enough that greedy argmax is not a near-tie
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
)

# preset -> (HF architecture, config overrides, max_shard_size or None)
PRESETS: dict[str, tuple[str, dict, str | None]] = {
    "llama": ("LlamaForCausalLM", {}, None),
    "llama3_tied": ("LlamaForCausalLM", dict(
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32)), None),
    # multi-query attention, and a window shorter than the tests' sequences
    "mistral": ("MistralForCausalLM", dict(num_key_value_heads=1, sliding_window=32), None),
    "qwen2": ("Qwen2ForCausalLM", dict(use_sliding_window=False), "100KB"),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32, use_sliding_window=False), None),
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
                "150KB"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(
        # Mixtral covers renormalised top-k; layer 0 keeps a dense MLP
        head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[0], use_sliding_window=False), None),
}
DEFAULT_PRESET = {arch: name for name, (arch, _, _) in reversed(PRESETS.items())}


def make_checkpoint(arch: str, path, seed: int = 0, *, dtype: str = "float32",
                    max_shard_size: str | None = None, **config_overrides) -> Path:
    """Write a tiny random checkpoint of ``arch`` to ``path``; returns ``path``.

    ``dtype`` is the dtype the weights are saved in (the model is always built in float32
    from ``torch.manual_seed(seed)``); ``max_shard_size`` overrides the preset's sharding.
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    hf_arch, preset, shard = PRESETS[DEFAULT_PRESET.get(arch, arch)]
    config_cls = getattr(transformers, hf_arch.replace("ForCausalLM", "Config"))
    config = config_cls(**{**_COMMON, **preset, **config_overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, hf_arch)(config).to(torch.float32).eval()
    _perturb(model, seed)
    model.to(getattr(torch, dtype))
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size or shard or "1GB")
    _write_tokenizer(path, config.vocab_size)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": PAD_ID}, indent=2))
    return path


def _perturb(model, seed: int) -> None:
    """The conformance engine tier's perturbation (norms, biases, router scale)."""
    from halserve.hal.conformance_engine import perturb

    perturb(model, seed)


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")] * 4, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} != config vocab_size {vocab_size}; "
                           f"grow {CORPUS.name} or lower vocab_size")
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, BOS_ID)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[PAD_ID],
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
