"""Qwen2/Qwen3 with a window on some layers only (``max_window_layers`` or ``layer_types``):
greedy decode token-exact against transformers (float32) well past the window."""
from __future__ import annotations

import pytest
import torch

from halserve import LLM, SamplingParams
from halserve.models.llama import layer_windows

WINDOW = 8


@pytest.mark.parametrize("preset,overrides", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=WINDOW,
                   layer_types=["sliding_attention", "full_attention"])),
])
def test_partial_window_matches_transformers(checkpoint, preset, overrides):
    from transformers import AutoModelForCausalLM

    path = checkpoint(preset, **overrides)
    prompt = torch.randint(5, 512, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    n = 24
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(str(path), dtype="float32", enforce_eager=True)
    got = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n))[0]
    assert got.outputs[0].token_ids == ref


def test_layer_windows_rules():
    base = dict(num_hidden_layers=4, sliding_window=16)
    assert layer_windows({**base, "architectures": ["MistralForCausalLM"]}) == [16] * 4
    q2 = {**base, "architectures": ["Qwen2ForCausalLM"], "max_window_layers": 3}
    assert layer_windows({**q2, "use_sliding_window": True}) == [None, None, None, 16]
    assert layer_windows({**q2, "use_sliding_window": False}) == [None] * 4
    with pytest.raises(ValueError, match="layer_types"):
        layer_windows({**q2, "use_sliding_window": True, "layer_types": ["full_attention"]})
