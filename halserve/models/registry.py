"""HF ``architectures[0]`` -> model class, imported only when asked for."""
from __future__ import annotations

import importlib

from halserve.errors import ModelLoadError

# architecture -> (module under halserve.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return list(_MODELS)


def resolve(architecture: str) -> type:
    """The model class for an HF architecture name; ModelLoadError naming the supported ones."""
    if architecture not in _MODELS:
        raise ModelLoadError(f"architecture {architecture!r} is not supported; "
                             f"supported: {', '.join(_MODELS)}")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(f"halserve.models.{module}"), name)
