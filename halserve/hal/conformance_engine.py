"""The engine tier of the conformance suite: whole models on the backend under test.

A backend can pass every op case and still break composition (a layout one op writes and the
next misreads, state kept between calls, a path only batches take). So: greedy decoding of
the demo model and of random dense (llama, MHA), GQA (qwen3: 4 query heads on 1 KV head,
q/k norms) and MoE (mixtral) checkpoints made here with transformers, on the backend and on
native, through ``LLM.generate`` (prefill, chunked prefill, decode, batching, the KV cache):

- float32: the greedy tokens must equal native's, token for token;
- bfloat16: the log-probabilities of native float32's tokens, scored teacher-forced as
  ``prompt_logprobs``, must be within ``BF16_LOGPROB_NMSE`` of native float32's.

``BF16_LOGPROB_NMSE`` derivation: native in bfloat16 measures 9e-7 (demo), 1.9e-6 (dense),
3.4e-6 (gqa) and 3.5e-5 (moe: router near-ties flip an expert now and then) NMSE against
native float32 on this machine (2-4 layers; each of ~10 bf16 stores a layer adds u = 2.75e-6
of relative mean-square error, amplified through the softmaxes and the residual stream). The
bound is 10x the worst, rounded up: 5e-4. A wrong op (a swapped half, a missing bias) moves
the log-probabilities by O(1): NMSE 1e-2 or more.

    halserve conformance --engine [--backend NAME]
    halserve.hal.conformance_engine.run_engine(backend) -> list[EngineResult]
"""
from __future__ import annotations

import contextlib
import json
import gc
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

BF16_LOGPROB_NMSE = 5e-4
MODELS = ("demo", "dense", "gqa", "moe")
DTYPES = ("float32", "bfloat16")
MAX_TOKENS = 8
# (prompt lengths): a 1-token prompt, a prefill that crosses block edges, and one chunked
PROMPT_LENS = (1, 7, 23, 40)

_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
# model -> (transformers architecture, config overrides)
_ARCH = {
    "dense": ("LlamaForCausalLM", dict(num_attention_heads=2, num_key_value_heads=2, attention_bias=True)),
    "gqa": ("Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                     use_sliding_window=False)),
    "moe": ("MixtralForCausalLM", dict(num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=None)),
}


@dataclass(slots=True)
class EngineResult:
    backend: str
    model: str
    dtype: str
    status: str  # PASS | FAIL
    metric: str  # tokens | logprob_nmse
    value: float
    limit: float
    detail: str = ""

    def line(self) -> str:
        m = ("did not run" if math.isinf(self.value) else f"{int(self.value)} tokens differ" if self.metric == "tokens"
             else f"logprob NMSE={self.value:.2e} (<= {self.limit:.0e})")
        text = f"{self.backend:<10} engine {self.model:<6} {self.dtype:<9} {self.status:<5} {m}"
        return text + (f"\n{'':<11}-> {self.detail}" if self.detail else "")


def perturb(model, seed: int) -> None:
    """Move norm weights off 1, biases off 0 and MoE router weights to a decisive scale (tiny
    router logits make top-k choices near-ties), so a kernel that ignores them is seen."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif ".gate." in name + "." and "proj" not in name:
                p.copy_(noise / p.shape[-1] ** 0.5)


def make_checkpoint(model: str, path: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint written by transformers (norm weights and biases moved off
    their trivial init, router logits at a decisive scale), token-id prompts only."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    arch, extra = _ARCH[model]
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    m = getattr(transformers, arch)(config).to(torch.float32).eval()
    perturb(m, seed)
    m.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


@contextlib.contextmanager
def _engine_backend(backend):
    """The engine picks its backend through ``hal.select``: hand it this instance."""
    from halserve import hal

    orig = hal.select
    if _has_graphs(backend):
        # one instance per engine, as the engine gets from hal.select: a graph-capturing
        # backend keeps its graph memory pool per instance, and a second engine capturing into
        # the first one's pool broke the CUDA allocator (H200, 2026-12-04)
        backend = type(backend)(device=backend.device, batch_invariant=backend.batch_invariant)
    hal.select = lambda name=None, batch_invariant=False: backend
    try:
        yield
    finally:
        hal.select = orig


def _has_graphs(backend) -> bool:
    try:
        return bool(backend.capabilities.graphs)
    except Exception:
        return False


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _generate(backend, path: str, dtype: str, prompts, **params):
    from halserve.engine.llm import LLM
    from halserve.engine.sampling import SamplingParams

    with _engine_backend(backend):
        # 16 tokens a step: the 23- and 40-token prompts prefill in chunks beside decodes
        llm = LLM(path, dtype=dtype, max_num_batched_tokens=32, max_num_seqs=8, block_size=16, max_model_len=128)
        try:
            return llm.generate(prompts, SamplingParams(temperature=0.0, ignore_eos=True, **params))
        finally:
            del llm
            gc.collect()


def _scored(outs) -> list[float]:
    vals = []
    for o in outs:
        for pos, lp in enumerate(o.prompt_logprobs or []):
            if lp is not None:
                vals.append(lp[o.prompt_token_ids[pos]].logprob)
    return vals


def _nmse(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return math.inf
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if not torch.isfinite(ta).all():
        return math.inf
    return float(((ta - tb) ** 2).sum() / (tb ** 2).sum())


def run_engine(backend, models=MODELS, dtypes=DTYPES, workdir: "str | Path | None" = None,
               on_result: Callable[[EngineResult], None] | None = None) -> list[EngineResult]:
    """The engine tier on ``backend`` (an instance, or a name for ``hal.create``)."""
    from halserve import hal
    from halserve.engine.llm import DEMO_MODEL
    from halserve.hal.native import NativeBackend

    if isinstance(backend, str):
        backend = hal.create(backend)
    native = NativeBackend()
    results = []
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for model in models:
            if model == "demo":
                path, vocab = str(DEMO_MODEL), 4096
            else:
                target = root / model
                if not (target / "config.json").exists():
                    make_checkpoint(model, target)
                path, vocab = str(target), _COMMON["vocab_size"]
            prompts = _prompts(vocab)
            ref = _generate(native, path, "float32", prompts, max_tokens=MAX_TOKENS)
            ref_tokens = [o.outputs[0].token_ids for o in ref]
            for dtype in dtypes:
                res = EngineResult(backend.name, model, dtype, "FAIL", "tokens", 0, 0)
                try:
                    if dtype == "float32":
                        got = [o.outputs[0].token_ids for o in
                               _generate(backend, path, dtype, prompts, max_tokens=MAX_TOKENS)]
                        bad = sum(x != y for a, b in zip(got, ref_tokens) for x, y in zip(a, b))
                        bad += sum(abs(len(a) - len(b)) for a, b in zip(got, ref_tokens))
                        res.value = bad
                        if bad:
                            first = next(i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b)
                            res.detail = f"prompt {first}: {got[first]} vs native {ref_tokens[first]}"
                    else:
                        full = [p + t for p, t in zip(prompts, ref_tokens)]
                        want = _scored(_generate(native, path, "float32", full, max_tokens=1, prompt_logprobs=0))
                        got = _scored(_generate(backend, path, dtype, full, max_tokens=1, prompt_logprobs=0))
                        res.metric, res.value, res.limit = "logprob_nmse", _nmse(got, want), BF16_LOGPROB_NMSE
                    res.status = "PASS" if res.value <= res.limit else "FAIL"
                except Exception as e:  # a failure to run is a FAIL, reported, never a crash
                    res.value = math.inf
                    res.detail = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                results.append(res)
                if on_result is not None:
                    on_result(res)
    return results
