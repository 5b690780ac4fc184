"""Config options our model code does not implement, refused by name at load time.

A checkpoint's config.json may carry options that change the math of a model (another
activation, logit soft-capping, partial rotary, a window on a family that has none...). Each is
either implemented by the model files or refused here, with one line that names the option, its
value and what is supported: never silently decoded as if it were absent.
"""
from __future__ import annotations

from halserve.errors import ModelLoadError

# HF ACT2FN names that are exactly SiLU (the only gate activation hal.silu_and_mul computes)
SILU_ACTS = ("silu", "swish")
# options of other families (Gemma 2's soft-capping and query scale, Granite's multipliers) that
# no supported family implements -> the values that mean "off"
_UNSUPPORTED = {
    "attn_logit_softcapping": (None,), "final_logit_softcapping": (None,), "query_pre_attn_scalar": (None,),
    "embedding_multiplier": (None, 1.0), "logits_scaling": (None, 1.0), "residual_multiplier": (None, 1.0),
    "attention_multiplier": (None,),
}
# the config key(s) of the expert count (transformers 5 saves Qwen3-MoE's as num_local_experts)
_MOE_EXPERTS = {"MixtralForCausalLM": ("num_local_experts",),
                "Qwen3MoeForCausalLM": ("num_experts", "num_local_experts")}
# families whose attention applies ``sliding_window`` (Llama's ignores it in transformers)
_WINDOWED = ("MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
             "Qwen3MoeForCausalLM")
# of those, the ones whose config gates the window with use_sliding_window (false unless set true)
_USE_WINDOW_KEY = _WINDOWED[2:]


def configured_window(cfg: dict, arch: str | None = None) -> int | None:
    """``sliding_window`` where the family applies it as transformers does: Qwen2/Qwen3/Qwen3-MoE
    only with ``use_sliding_window`` true (their configs default it to false); others whenever set."""
    arch = arch or (cfg.get("architectures") or [""])[0]
    if arch in _USE_WINDOW_KEY and not cfg.get("use_sliding_window", False):
        return None
    return cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None


def check_config(cfg: dict, arch: str, where: str) -> None:
    """Raise ModelLoadError for the first option in ``cfg`` the model code cannot honour."""
    def refuse(msg: str) -> None:
        raise ModelLoadError(f"{where}: {arch} {msg}")

    act = cfg.get("hidden_act", "silu")
    if act not in SILU_ACTS:
        refuse(f"hidden_act={act!r} is not supported; supported: {', '.join(SILU_ACTS)}")
    for key, off in _UNSUPPORTED.items():
        if cfg.get(key) not in off:
            refuse(f"{key}={cfg[key]!r} is not supported (only {' or '.join(map(_json, off))})")
    rope = cfg.get("rope_parameters") or {}
    nested = [v for v in rope.values() if isinstance(v, dict)]
    if nested and any(v != nested[0] for v in nested):
        refuse(f"rope_parameters differing per layer type ({', '.join(rope)}) are not supported (one rope for all)")
    for scope in [cfg, cfg.get("rope_scaling") or {}, rope, *nested]:
        prf = scope.get("partial_rotary_factor")
        if prf is not None and float(prf) != 1.0:
            refuse(f"partial_rotary_factor={prf!r} is not supported (only 1.0: the whole head rotates)")
    if configured_window(cfg, arch) is not None and arch not in _WINDOWED:
        refuse(f"sliding_window={cfg['sliding_window']!r} is not supported: transformers' {arch} attends to "
               f"the whole context; set it to null, or use a family with windows ({', '.join(_WINDOWED[:2])})")
    experts_key = next((k for k in _MOE_EXPERTS.get(arch, ()) if cfg.get(k)), None)
    n = cfg[experts_key] if experts_key else 0
    if n:  # (Qwen3-MoE with no experts is dense throughout)
        k = cfg.get("num_experts_per_tok")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            refuse(f"num_experts_per_tok={k!r} is not valid: must be an integer in 1..{experts_key} ({n})")


def _json(v) -> str:
    return "null" if v is None else repr(v)
