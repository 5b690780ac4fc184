"""``speculative_config``: the dict a user passes (``LLM(speculative_config=...)``,
``--speculative-config JSON``), checked field by field. Names follow vLLM's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# method -> fields it takes besides method and num_speculative_tokens
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "ngram": ("prompt_lookup_max", "prompt_lookup_min"),
    "draft_model": ("model", "draft_dtype"),
    "eagle": ("model",),
    "callable": ("proposer",),
}
_MTP = ("MTP layers are read from the target's own checkpoint and no architecture halserve loads has "
        "them (DeepSeek-V3, GLM-4.5, MiMo and Qwen3-Next carry them; halserve does not load those targets)")
# refused by name rather than accepted and ignored
REFUSED_METHODS = {
    "mtp": _MTP, "deepseek_mtp": _MTP,
    "eagle3": "EAGLE-3 heads (which read several target layers) are not supported; EAGLE-1/2 heads are "
              "(method 'eagle')",
    "medusa": "Medusa heads are not supported",
}
MAX_SPECULATIVE_TOKENS = 32


class SpeculativeConfigError(ValueError):
    """A bad ``speculative_config``; the message names the field and what is valid."""


@dataclass(slots=True, frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    draft_dtype: str = "auto"
    proposer: Callable[[list[int]], Any] | None = None


def _int_field(d: dict, name: str, default: int | None, lo: int, hi: int) -> int:
    v = d.get(name, default)
    if v is None:
        raise SpeculativeConfigError(f"speculative_config needs {name!r} (an integer in [{lo}, {hi}])")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SpeculativeConfigError(f"speculative_config {name}={v!r} is not valid: an integer in [{lo}, {hi}]")
    return v


def parse_speculative_config(d: "dict | SpeculativeConfig | None") -> SpeculativeConfig | None:
    """The validated config, or None (no speculation) for None / ``{}``."""
    if d is None or isinstance(d, SpeculativeConfig):
        return d
    if not isinstance(d, dict):
        raise SpeculativeConfigError(f"speculative_config must be a dict, not {type(d).__name__}")
    if not d:
        return None
    method = d.get("method")
    if method is None and "model" in d:
        method = "ngram" if d["model"] in ("ngram", "[ngram]") else "draft_model"  # vLLM's older form
        d = {**d, "method": method}
        if method == "ngram":
            d.pop("model")
    valid = ", ".join(sorted(METHOD_FIELDS))
    if method in REFUSED_METHODS:
        raise SpeculativeConfigError(f"speculative_config method={method!r} is not supported: "
                                     f"{REFUSED_METHODS[method]}; valid methods: {valid}")
    if method not in METHOD_FIELDS:
        raise SpeculativeConfigError(f"speculative_config method={method!r} is not valid; valid methods: {valid}")
    allowed = {"method", "num_speculative_tokens", *METHOD_FIELDS[method]}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise SpeculativeConfigError(f"speculative_config field(s) {', '.join(map(repr, unknown))} are not "
                                     f"valid for method {method!r}; valid fields: {', '.join(sorted(allowed))}")
    k = _int_field(d, "num_speculative_tokens", None, 1, MAX_SPECULATIVE_TOKENS)
    if method == "ngram":
        hi = _int_field(d, "prompt_lookup_max", 4, 1, 64)
        lo = _int_field(d, "prompt_lookup_min", min(hi, 1), 1, 64)
        if lo > hi:
            raise SpeculativeConfigError(f"speculative_config prompt_lookup_min={lo} must be <= "
                                         f"prompt_lookup_max={hi}")
        return SpeculativeConfig(method, k, prompt_lookup_max=hi, prompt_lookup_min=lo)
    if method == "eagle":
        model = d.get("model")
        if not isinstance(model, str) or not model:
            raise SpeculativeConfigError(f"speculative_config model={model!r} is not valid: the EAGLE head's "
                                         "checkpoint directory (a Llama config.json, fc.weight and layers.0.*)")
        return SpeculativeConfig(method, k, model=model)
    if method == "draft_model":
        model = d.get("model")
        if not isinstance(model, str) or not model:
            raise SpeculativeConfigError(f"speculative_config model={model!r} is not valid: the draft "
                                         "model's checkpoint directory (it must share the target's tokenizer)")
        dtype = d.get("draft_dtype", "auto")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SpeculativeConfigError(f"speculative_config draft_dtype={dtype!r} is not valid; use auto, "
                                         "float32, bfloat16 or float16")
        return SpeculativeConfig(method, k, model=model, draft_dtype=dtype)
    fn = d.get("proposer")
    if isinstance(fn, str):  # "package.module:function": how a JSON config (the server's flag) names one
        fn = _import_proposer(fn)
    if not callable(fn):
        raise SpeculativeConfigError(f"speculative_config proposer={fn!r} is not valid: a callable that takes "
                                     "a sequence's token ids and returns up to num_speculative_tokens token ids")
    return SpeculativeConfig(method, k, proposer=fn)


def _import_proposer(path: str):
    """The callable a "module:attribute" string names; a clear error when it cannot be had."""
    import importlib

    mod, sep, attr = path.partition(":")
    if not sep or not mod or not attr:
        raise SpeculativeConfigError(f"speculative_config proposer={path!r} is not valid: name a callable as "
                                     "'package.module:function'")
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # ImportError, AttributeError, or the module's own error on import
        raise SpeculativeConfigError(f"speculative_config proposer={path!r} could not be loaded: "
                                     f"{type(e).__name__}: {e}".replace("\n", " ")) from None
    if not callable(obj):
        raise SpeculativeConfigError(f"speculative_config proposer={path!r} is not callable")
    return obj
