"""``kv_cache_dtype="fp8"`` end to end: accuracy against the model-dtype cache on a random
Llama (MHA) and a GQA model, the block bytes, scales read from a checkpoint, KV offload of
fp8 blocks, and bad values refused on the CLI and the server."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from halserve import LLM, SamplingParams
from halserve.hal.kv_fp8 import dequantize_kv

FP8 = torch.float8_e4m3fn
PROMPTS = [[5, 17, 42, 99, 3], list(range(10, 47)), [7] * 3 + list(range(200, 214)), list(range(300, 340))]
N = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
# a small cache and few graph buckets: two engines at once fit a GPU, and both engines of a
# comparison get the same blocks (the cache is capped at what 4 sequences can use)
KW = dict(kv_cache_memory=32 << 20, max_num_seqs=4)
# NMSE of one round-to-nearest e4m3 store (p = 4 significand bits; docs/conformance.md's u)
U_E4M3 = 2.0 ** -6 * 0.541 / 12
# Teacher-forced log-probabilities of the auto cache's greedy tokens, fp8 cache vs auto: the
# only difference is one e4m3 rounding of every cached K and V (NMSE u each), which attention
# then averages over many keys. Measured here: 4.4e-5 (MHA) and 8.1e-5 (GQA) = 0.06u and 0.12u;
# the limit is u itself, 8x the worst.
LOGPROB_NMSE_LIMIT = U_E4M3
# The greedy token may change only at a near-tie of the auto cache's top two: measured 61/64
# (MHA) and 60/64 (GQA) positions agree, every flip at a top-2 gap under 0.065 nats (the
# median gap is 0.2); the tests ask for 85% and gaps under 0.1.
AGREE_MIN, FLIP_GAP_MAX = 0.85, 0.1


@pytest.fixture(scope="module")
def models(checkpoint):
    return {"mha": checkpoint("llama", num_key_value_heads=4), "gqa": checkpoint("qwen3")}


def _scored(llm: LLM, prompts, tokens):
    """Teacher-forced: per position after each prompt, (logprob of ``tokens``' token, the top
    token, the gap between the top two logprobs)."""
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2)
    outs = llm.generate([p + t for p, t in zip(prompts, tokens)], sp)
    rows = []
    for p, t, o in zip(prompts, tokens, outs):
        for tok, lp in zip(t, o.prompt_logprobs[len(p):]):
            ranked = sorted(lp.items(), key=lambda kv: -kv[1].logprob)
            rows.append((lp[tok].logprob, ranked[0][0], ranked[0][1].logprob - ranked[1][1].logprob))
    return rows


@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_fp8_cache_tracks_the_model_dtype_cache(models, which):
    path = str(models[which])
    auto = LLM(path, dtype="float32", **KW)
    fp8 = LLM(path, dtype="float32", kv_cache_dtype="fp8", **KW)
    assert fp8.engine.runner.kv_cache.dtype == FP8 and auto.engine.runner.kv_cache.dtype == torch.float32
    ref = [o.outputs[0].token_ids for o in auto.generate(PROMPTS, GREEDY)]
    fp8.generate(PROMPTS, GREEDY)  # free-running greedy through the fp8 cache (decode path)
    a, f = _scored(auto, PROMPTS, ref), _scored(fp8, PROMPTS, ref)
    la = torch.tensor([r[0] for r in a], dtype=torch.float64)
    lf = torch.tensor([r[0] for r in f], dtype=torch.float64)
    err = ((lf - la) ** 2).sum().item() / (la ** 2).sum().item()
    assert 0 < err < LOGPROB_NMSE_LIMIT, err
    assert all(ra[1] == tok for ra, tok in zip(a, sum(ref, [])))  # auto's top-1 is its greedy token
    flips = [ra[2] for ra, rf in zip(a, f) if ra[1] != rf[1]]
    assert len(flips) <= (1 - AGREE_MIN) * len(a), flips
    assert all(gap < FLIP_GAP_MAX for gap in flips), flips


def test_block_bytes_halve_against_bf16(models):
    path = str(models["gqa"])
    budget = 4 << 20
    bf16 = LLM(path, dtype="bfloat16", kv_cache_memory=budget, enforce_eager=True)
    fp8 = LLM(path, dtype="bfloat16", kv_cache_memory=budget, kv_cache_dtype="fp8_e4m3", enforce_eager=True)
    rb, r8 = bf16.engine.runner, fp8.engine.runner
    assert rb.bytes_per_block() == 2 * r8.bytes_per_block()
    assert r8.num_blocks == 2 * rb.num_blocks
    assert r8.kv_cache.element_size() == 1 and r8.kv_cache.numel() * 1 == r8.num_blocks * r8.bytes_per_block()


def _with_scales(src: Path, dst: Path, names: tuple[str, str], k: float, v: float, layers: int = 2) -> Path:
    """A copy of ``src`` whose safetensors also hold per-layer KV scales named ``names``."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    for f in src.glob("*.safetensors"):
        tensors = load_file(str(f))
        for i in range(layers):
            tensors[f"model.layers.{i}.self_attn.{names[0]}"] = torch.tensor(k, dtype=torch.float32)
            tensors[f"model.layers.{i}.self_attn.{names[1]}"] = torch.tensor(v, dtype=torch.float32)
        save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("k", [0.0, -1.0, 1e-39, float("inf"), float("nan")])
def test_a_bad_checkpoint_scale_is_a_load_error(models, tmp_path, k):
    """A zero, negative, subnormal or non-finite k_scale would make every stored key inf or
    NaN (the cache holds x / scale): refused at load, naming the tensor, not a fault at the
    first write that fails every request in flight (a subnormal scale passed before)."""
    from halserve.errors import ModelLoadError

    bad = _with_scales(Path(models["mha"]), tmp_path / "bad", ("k_scale", "v_scale"), k, 1.0)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.self_attn\.k_scale must be one finite float >= 1e-30"):
        LLM(str(bad), dtype="float32", kv_cache_dtype="fp8", enforce_eager=True, **KW)


@pytest.mark.parametrize("names", [("k_scale", "v_scale"), ("k_proj.output_scale", "v_proj.output_scale")])
def test_checkpoint_scales_change_what_is_stored(models, tmp_path, names):
    """k_scale=4, v_scale=0.25 from the checkpoint: the cache holds K/4 and V*4 in e4m3, and
    reads back (times the scales) as the model-dtype cache's K and V to one e4m3 rounding."""
    src = Path(models["mha"])
    scaled = _with_scales(src, tmp_path / "scaled", names, 4.0, 0.25)
    prompt, sp = [PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=1)
    auto = LLM(str(src), dtype="float32", enable_prefix_caching=False, enforce_eager=True, **KW)
    auto.generate(prompt, sp)
    fp8 = LLM(str(scaled), dtype="float32", enable_prefix_caching=False, kv_cache_dtype="fp8", enforce_eager=True,
              **KW)
    fp8.generate(prompt, sp)
    attn = fp8.engine.model.layers[1].self_attn
    assert attn.kv_scales == {"k_scale": 4.0, "v_scale": 0.25}
    # layer 0: its K and V depend on the prompt alone (later layers see the fp8 cache's output)
    ref, kv = auto.engine.runner.kv_cache[0], fp8.engine.runner.kv_cache[0]
    mask = ref[0] != 0  # the slots the prompt wrote (the same blocks in both engines)
    k_true, v_true = ref[0][mask], ref[1][mask]
    k_raw, v_raw = kv[0][mask].float(), kv[1][mask].float()
    # stored = K / 4 and V * 4, to half an e4m3 step: 2^-4 relative, 2^-10 absolute (subnormals)
    assert torch.allclose(k_raw * 4.0, k_true, rtol=2 ** -4, atol=4.0 * 2 ** -10)
    assert torch.allclose(v_raw * 0.25, v_true, rtol=2 ** -4, atol=0.25 * 2 ** -10)
    for raw, true, s in ((kv[0][mask], k_true, 4.0), (kv[1][mask], v_true, 0.25)):
        err = ((dequantize_kv(raw, s) - true) ** 2).sum() / (true ** 2).sum()
        assert err < 2 * U_E4M3, err
    # and they are read back: the scaled cache scores like the model-dtype one
    ref_tokens = [o.outputs[0].token_ids for o in auto.generate(PROMPTS[:2], GREEDY)]
    la = torch.tensor([r[0] for r in _scored(auto, PROMPTS[:2], ref_tokens)], dtype=torch.float64)
    lf = torch.tensor([r[0] for r in _scored(fp8, PROMPTS[:2], ref_tokens)], dtype=torch.float64)
    assert ((lf - la) ** 2).sum().item() / (la ** 2).sum().item() < LOGPROB_NMSE_LIMIT
    # the scales do not leak into a model-dtype cache (vLLM ignores them there too)
    plain = LLM(str(scaled), dtype="float32", enable_prefix_caching=False, enforce_eager=True, **KW)
    assert plain.engine.model.layers[1].self_attn.kv_scales == {}


def test_fp8_blocks_offload_to_disk_and_come_back(models, tmp_path):
    """fp8 blocks go through the host and file tiers as fp8 bytes and reload unchanged; a
    model-dtype cache never reads them (the tier fingerprint names the dtype and scales)."""
    path = str(models["mha"])
    long = [list(range(30, 130))]  # 6 full blocks
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ref = LLM(path, dtype="float32", enable_prefix_caching=False, kv_cache_dtype="fp8", **KW).generate(long, sp)
    llm = LLM(path, dtype="float32", kv_cache_dtype="fp8", kv_offload_dir=str(tmp_path), kv_offload_host_bytes=1 << 20,
              **KW)
    assert llm.generate(long, sp)[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    eng = llm.engine
    eng.connector.manager.flush()
    eng.kv.reset_prefix_cache()
    eng.connector.manager.host.clear()  # only the files are left
    out = llm.generate(long, sp)
    assert out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids and out[0].num_cached_tokens == 96
    assert llm.get_metrics()["offload"]["disk"]["hits"] == 6
    other = LLM(path, dtype="float32", kv_offload_dir=str(tmp_path), kv_offload_host_bytes=1 << 20, **KW)
    assert other.generate(long, sp)[0].num_cached_tokens == 0
    assert other.engine.connector.manager.block_bytes == 4 * eng.connector.manager.block_bytes  # float32 vs e4m3


@pytest.mark.parametrize("value", ["fp8_e5m2", "garbage"])
def test_cli_refuses_bad_values_in_one_line(value, capsys):
    """``halserve generate`` (and serve: tests/server/test_serve_flags.py) before any loading."""
    from halserve.cli import main

    rc = main(["generate", "--kv-cache-dtype", value, "--max-tokens", "2"])
    out = capsys.readouterr()
    text = (out.out + out.err).strip()
    assert rc == 2 and "Traceback" not in text, text
    assert len(text.splitlines()) == 1 and f"kv_cache_dtype={value!r}" in text and "fp8_e4m3" in text, text


@pytest.mark.parametrize("value", ["fp8_e5m2", "garbage", "fp8"])
def test_server_answers_400_for_a_per_request_cache_dtype(value):
    """The cache dtype is an engine setting (as in vLLM): a request that sets it gets a 400
    naming the field, whatever the value, never a silent ignore."""
    from fastapi.testclient import TestClient

    from halserve.server.openai import build_app
    from tests.server.fake_engine import FakeEngine

    with TestClient(build_app(FakeEngine(max_model_len=64), ["fake"]), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2,
                                            "kv_cache_dtype": value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "kv_cache_dtype" and "kv_cache_dtype" in err["message"], err
