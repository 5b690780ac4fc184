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
# options no supported family implements; refused whenever set to anything but null
_UNSUPPORTED = ("attn_logit_softcapping", "final_logit_softcapping")
# the config key(s) of the expert count (transformers 5 saves Qwen3-MoE's as num_local_experts)
_MOE_EXPERTS = {"MixtralForCausalLM": ("num_local_experts",),
                "Qwen3MoeForCausalLM": ("num_experts", "num_local_experts")}
# families whose attention applies ``sliding_window`` (Llama's ignores it in transformers)
_WINDOWED = ("MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
             "Qwen3MoeForCausalLM")


def check_config(cfg: dict, arch: str, where: str) -> None:
    """Raise ModelLoadError for the first option in ``cfg`` the model code cannot honour."""
    def refuse(msg: str) -> None:
        raise ModelLoadError(f"{where}: {arch} {msg}")

    act = cfg.get("hidden_act", "silu")
    if act not in SILU_ACTS:
        refuse(f"hidden_act={act!r} is not supported; supported: {', '.join(SILU_ACTS)}")
    for key in _UNSUPPORTED:
        if cfg.get(key) is not None:
            refuse(f"{key}={cfg[key]!r} is not supported (only null)")
    rope = cfg.get("rope_parameters") or {}
    for scope in [cfg, cfg.get("rope_scaling") or {}, rope, *(v for v in rope.values() if isinstance(v, dict))]:
        prf = scope.get("partial_rotary_factor")
        if prf is not None and float(prf) != 1.0:
            refuse(f"partial_rotary_factor={prf!r} is not supported (only 1.0: the whole head rotates)")
    if cfg.get("sliding_window") is not None and cfg.get("use_sliding_window", True) and arch not in _WINDOWED:
        refuse(f"sliding_window={cfg['sliding_window']!r} is not supported: transformers' {arch} attends to "
               f"the whole context; set it to null, or use a family with windows ({', '.join(_WINDOWED[:2])})")
    experts_key = next((k for k in _MOE_EXPERTS.get(arch, ()) if cfg.get(k)), None)
    n = cfg[experts_key] if experts_key else 0
    if n:  # (Qwen3-MoE with no experts is dense throughout)
        k = cfg.get("num_experts_per_tok")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            refuse(f"num_experts_per_tok={k!r} is not valid: must be an integer in 1..{experts_key} ({n})")
