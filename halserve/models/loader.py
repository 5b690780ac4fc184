"""Load an HF checkpoint directory: config.json, (sharded) safetensors, generation_config.json.

Tensors are read one at a time from memory-mapped safetensors files, cast to the model dtype,
moved to the backend's device and packed by the backend, so a weight is never held twice
beyond the layer being built.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from halserve.errors import ModelLoadError
from halserve.hal.interface import Backend
from halserve.models import registry
from halserve.models.checks import check_config, configured_window

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_SCHEMES = ("none", "fp8", "int8", "int8_w8a8", "int4", "int4_g32", "int4_g64", "int4_g128")
# tensors a checkpoint may carry that no model here reads
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(slots=True)
class ModelConfig:
    """What the engine needs to know about a checkpoint; ``hf_config`` is config.json as is.
    ``eos_token_ids`` merges config.json's and generation_config.json's (int or list)."""

    path: str
    architecture: str
    hf_config: dict
    dtype: torch.dtype
    max_position_embeddings: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    sliding_window: int | None
    # the KV cache's storage dtype: ``dtype``, or float8_e4m3fn (``load_model(kv_cache_dtype=)``)
    kv_dtype: "torch.dtype | None" = None
    kv_scales: tuple = ()  # fp8 cache: ((k_scale, v_scale) per layer); stored KV means nothing without them

    def __post_init__(self) -> None:
        if self.kv_dtype is None:
            self.kv_dtype = self.dtype


def load_model(path, hal: Backend, dtype="auto", quantization: str | None = None, kv_cache_dtype: str = "auto",
               quantize_lm_head: bool = False):
    """Build the model in ``path`` on ``hal``; returns ``(model, ModelConfig)``.

    ``dtype``: 'auto' (the checkpoint's own dtype), a name like 'bfloat16', or a torch.dtype.
    ``quantization``: None or a name in ``_SCHEMES``; linear weights are quantized by
    ``hal.pack_weight`` at load; the lm_head too with ``quantize_lm_head`` (refused without a
    quantization), else it stays in the model dtype. ``kv_cache_dtype``: an EngineConfig value; with fp8 the
    per-layer KV scales are read from the checkpoint (``_kv_scales``) and set on each
    attention layer. Raises ModelLoadError for anything the user can fix.
    """
    start = time.perf_counter()
    config = load_config(path, dtype)
    scheme = _scheme(quantization, hal)
    if quantize_lm_head and scheme == "none":
        raise ModelLoadError("quantize_lm_head needs a quantization scheme (it puts the lm_head in that scheme)")
    model_cls = registry.resolve(config.architecture)
    root = Path(config.path)
    weights = Weights(root, _weight_files(root), config.dtype, hal.device or "cpu", scheme,
                      scheme if quantize_lm_head else "none")
    with torch.inference_mode():
        model = model_cls(config.hf_config, hal, weights)
    _kv_scales(model, weights, config, kv_cache_dtype, hal)
    unused = weights.unused()
    if unused:
        logger.warning("%s: %d checkpoint tensors unused, e.g. %s", config.path, len(unused), unused[:3])
    logger.info("loaded %s (%s) dtype=%s quantization=%s in %.2fs", config.path, config.architecture,
                str(config.dtype).removeprefix("torch."), scheme, time.perf_counter() - start)
    return model, config


def _kv_scales(model, weights: "Weights", config: ModelConfig, kv_cache_dtype: str, hal: Backend) -> None:
    """Set ``config.kv_dtype`` and, for an fp8 cache, each attention layer's k/v scales:
    the checkpoint's (vLLM / llm-compressor names: ``self_attn.k_scale`` / ``v_scale`` or
    ``self_attn.k_proj.output_scale`` / ``v_proj.output_scale``), else 1.0 as vLLM does.
    A model-dtype cache reads none of them (they are left unused, as vLLM ignores them)."""
    from halserve.hal.kv_fp8 import is_fp8, kv_storage_dtype

    try:
        config.kv_dtype = kv_storage_dtype(kv_cache_dtype or "auto", config.dtype)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if not is_fp8(config.kv_dtype):
        return
    layers = getattr(model, "layers", None) or []
    found, per_layer = 0, []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "kv_scales"):
            raise ModelLoadError(f"{config.architecture}: layer {i} has no attention layer that can hold an "
                                 f"fp8 KV cache; use kv_cache_dtype='auto'")
        a = f"model.layers.{i}.self_attn."
        scales = {}
        for kv in ("k", "v"):
            name = next((n for n in (f"{a}{kv}_scale", f"{a}{kv}_proj.output_scale") if n in weights), None)
            scales[f"{kv}_scale"] = 1.0 if name is None else weights.scalar(name)
            found += name is not None
        attn.kv_scales = scales
        per_layer.append((scales["k_scale"], scales["v_scale"]))
    config.kv_scales = tuple(per_layer)
    # the start-up line says where the cache's ops run (backends that cannot read fp8 send
    # them to native, which their one-line describe() cannot show)
    how = {op: hal.supports(op, dtype=config.dtype, kv_dtype=config.kv_dtype) for op in ("write_kv", "attention")}
    logger.info("fp8 KV cache: %s; on %s: %s", f"per-layer scales from the checkpoint ({found} tensors)" if found
                else "no scales in the checkpoint: k_scale = v_scale = 1.0 (vLLM's default)", hal.name,
                "; ".join(f"{op} {'runs here' if a is True else a}" for op, a in how.items()))


def load_config(path, dtype="auto") -> ModelConfig:
    """Read config.json and generation_config.json into a ModelConfig (no weights)."""
    root = Path(path)
    try:
        is_dir = root.is_dir()
    except OSError:  # e.g. a prompt passed where the model path goes: name too long
        is_dir = False
    if not is_dir:
        raise ModelLoadError(f"model path {str(path)!r} is not a directory "
                             f"(expected one with config.json and *.safetensors)")
    cfg = _read_json(root / "config.json", required=True)
    archs = cfg.get("architectures") or []
    if not archs:
        raise ModelLoadError(f"{root / 'config.json'} has no 'architectures' entry; "
                             f"supported: {', '.join(registry.supported_architectures())}")
    if cfg.get("quantization_config"):
        raise ModelLoadError(f"{root}: pre-quantized checkpoints are not supported; load the "
                             f"unquantized one with quantization='fp8' or 'int8'")
    registry.resolve(archs[0])  # fail early, naming what is supported
    check_config(cfg, archs[0], str(root))  # options the model code cannot honour, by name
    gen = _read_json(root / "generation_config.json", required=False)
    return ModelConfig(
        path=str(root),
        architecture=archs[0],
        hf_config=cfg,
        dtype=_dtype(dtype, cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        num_layers=cfg["num_hidden_layers"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        eos_token_ids=_ids(cfg.get("eos_token_id"), gen.get("eos_token_id")),
        bos_token_id=next(iter(_ids(cfg.get("bos_token_id"), gen.get("bos_token_id"))), None),
        sliding_window=configured_window(cfg, archs[0]),
    )


class Weights:
    """Lazy view of a checkpoint's tensors. ``get`` reads one tensor from the mmap, casts it
    to the model dtype and device, and records it as used."""

    def __init__(self, root: Path, files: dict[str, Path], dtype: torch.dtype, device, scheme: str,
                 lm_head_scheme: str = "none"):
        from safetensors import safe_open

        self.root = root
        self.dtype, self.device, self.scheme = dtype, torch.device(device), scheme
        self.lm_head_scheme = lm_head_scheme  # the output projection's ("none": the model dtype)
        self._file_of = files
        self._handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in set(files.values())}
        self._used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise ModelLoadError(f"{self.root} lacks tensor {name!r}")
        self._used.add(name)
        t = self._handles[self._file_of[name]].get_tensor(name)
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def scalar(self, name: str) -> float:
        """A one-element tensor (a KV scale) as a float, never cast to the model dtype."""
        self._used.add(name)
        t = self._handles[self._file_of[name]].get_tensor(name)
        # the cache stores x * (1 / scale) in float32: a scale below ~3e-39 has no finite reciprocal
        if t.numel() != 1 or not t.is_floating_point() or not bool(torch.isfinite(t).all()) or float(t) < 1e-30:
            raise ModelLoadError(f"{self.root}: {name} must be one finite float >= 1e-30 (a KV cache scale), "
                                 f"got shape {tuple(t.shape)} {t.dtype}"
                                 + (f" = {float(t)!r}" if t.numel() == 1 and t.is_floating_point() else ""))
        return float(t.float())

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self else None

    def first(self, *names: str) -> str:
        """The first of ``names`` the checkpoint holds (the last one if none, so ``get``
        names it in its error)."""
        return next((n for n in names if n in self), names[-1])

    def experts(self, prefixes: list[str], names: tuple[str, str, str], num_experts: int, hidden: int):
        """Expert weights stacked as w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I].

        Reads per-expert tensors ``{prefix}{e}.{gate|up|down}.weight`` or, where a checkpoint
        was saved already fused, ``{prefix}gate_up_proj`` / ``{prefix}down_proj``."""
        gate, up, down = names
        for p in prefixes:
            if f"{p}0.{gate}.weight" in self:
                w13 = torch.stack([torch.cat([self.get(f"{p}{e}.{gate}.weight"), self.get(f"{p}{e}.{up}.weight")])
                                   for e in range(num_experts)])
                w2 = torch.stack([self.get(f"{p}{e}.{down}.weight") for e in range(num_experts)])
                return w13, w2
            if f"{p}gate_up_proj" in self:
                return self._fused(p, num_experts, hidden)
        raise ModelLoadError(f"{self.root} lacks expert weights {prefixes[0]}0.{gate}.weight "
                             f"(or a fused {prefixes[0]}gate_up_proj)")

    def _fused(self, p: str, num_experts: int, hidden: int):
        w13, w2 = self.get(p + "gate_up_proj"), self.get(p + "down_proj")
        if w13.shape[0] != num_experts:
            raise ModelLoadError(f"{p}gate_up_proj has {w13.shape[0]} experts, config says {num_experts}")
        # transformers 5 fuses as [E, 2I, H] / [E, H, I]; older fused checkpoints stored the
        # transposes. Where both read the same (2I == H or I == H) the first is assumed.
        if w13.shape[2] != hidden:
            w13 = w13.transpose(1, 2).contiguous()
        if w2.shape[1] != hidden:
            w2 = w2.transpose(1, 2).contiguous()
        return w13, w2

    def unused(self) -> list[str]:
        return sorted(n for n in self._file_of if n not in self._used and not n.endswith(_IGNORED_SUFFIXES))


def _weight_files(root: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or every *.safetensors file."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, required=True).get("weight_map") or {}
        missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if missing:
            raise ModelLoadError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return {name: root / f for name, f in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = f" (found {', '.join(other[:3])}: only safetensors are supported)" if other else ""
        raise ModelLoadError(f"{root} has no *.safetensors weight files{hint}")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update((k, f) for k in h.keys())
    return out


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.parent} has no {path.name} (not an HF model directory?)")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _dtype(dtype, cfg: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # no dtype in the config: float32, the dtype transformers would load it in
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _scheme(quantization: str | None, hal: Backend) -> str:
    scheme = quantization or "none"
    if scheme not in _SCHEMES:
        raise ModelLoadError(f"quantization {quantization!r} is not supported; use None, {', '.join(_SCHEMES[1:])}")
    if scheme not in hal.capabilities.quant_schemes:
        raise ModelLoadError(f"backend {hal.name} cannot run quantization {scheme!r}; "
                             f"it supports {', '.join(hal.capabilities.quant_schemes)}")
    return scheme


def _ids(*values) -> list[int]:
    """Merge int / list / None token id fields, keeping first-seen order."""
    out: list[int] = []
    for v in values:
        for i in ([v] if isinstance(v, int) else v or []):
            if i not in out:
                out.append(i)
    return out


def checkpoint_fingerprint(path) -> bytes:
    """A content fingerprint of a checkpoint, the same wherever the directory sits: config.json
    plus, for each safetensors file, its name, size, header and samples of its data. Two
    random checkpoints of one shape differ in their sampled bytes, so KV never crosses them."""
    root = Path(path)
    h = hashlib.sha256((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(fh.read(min(n, 1 << 20)))
            for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
                fh.seek(max(0, min(size - 4096, 8 + n + int((size - 8 - n) * frac))))
                h.update(fh.read(4096))
    return h.digest()
