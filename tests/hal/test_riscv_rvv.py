"""riscv_rvv through cffi on this machine (the scalar build of the same C source; the RVV
build runs under qemu, tools/riscv_qemu.sh): probe and forcing, supports(), the exact
float16/bfloat16 conversions, the counter-based sampler against native, bitwise batch
invariance, and greedy decode token for token against native."""
from __future__ import annotations

import platform

import pytest
import torch

from halserve import hal
from halserve.hal import cbuild
from halserve.hal.interface import AttentionMetadata, SamplingTensors
from halserve.hal.native import NativeBackend, sample_random
from halserve.hal.riscv_rvv import RvvBackend

pytestmark = pytest.mark.skipif(not RvvBackend.interpreter_ok(), reason="the C kernels do not build here")


@pytest.fixture(scope="module")
def rvv():
    return hal.create("riscv_rvv")


def test_probe_and_forcing():
    res = RvvBackend.probe()
    if platform.machine() != "riscv64":
        assert res.score == 0 and "riscv64" in res.reason
    else:
        assert res.score > NativeBackend.probe().score
    from halserve.hal.conformance import runnable_backends

    assert "riscv_rvv" in dict(runnable_backends())  # CI's conformance runs it forced


def test_supports_says_what_the_c_path_takes(rvv):
    assert rvv.supports("linear", dtype="bfloat16", scheme="int8", m=1, k=64, n=64) is True
    assert rvv.supports("moe", dtype=torch.float16, scheme="none") is True
    assert str(rvv.supports("linear", dtype="float32", scheme="fp8")).startswith("native fallback")
    assert str(rvv.supports("moe", dtype="float32", scheme="fp8_per_tensor")).startswith("native fallback")
    assert str(rvv.supports("linear", dtype="float64")).startswith(("native fallback", "refused"))
    assert str(rvv.supports("nope")).startswith("refused")
    # every op has a C kernel but the fused rotary_write_kv, which runs native's composite
    # (the C rotary, then the C write_kv)
    assert all(rvv.supports(op) is True for op in hal.interface.OPS if op != "rotary_write_kv")
    assert str(rvv.supports("rotary_write_kv")).startswith("native fallback")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conversions_round_like_torch(rvv, dtype):
    """write_kv float32 -> half types: every rounding case (ties, subnormals, overflow to inf,
    nan, signed zero) bit-equal to torch's conversion."""
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([torch.randn(4000, generator=g) * 10 ** torch.randint(-9, 6, (4000,), generator=g),
                      torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.9, 65520.0, 70000.0,
                                    2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14 * 0.99999, 1e-40, 1 + 2.0 ** -11,
                                    1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3e38])])
    vals = torch.cat([vals, torch.tensor([0.0] * (-vals.numel() % 64))])
    t = vals.numel() // 64
    key = vals.view(t, 1, 64)
    cache = torch.zeros(2, t, 1, 1, 64, dtype=dtype)
    rvv.write_kv(key, key, cache, torch.arange(t))
    want = key.to(dtype).view(torch.int16)
    assert torch.equal(cache[0].reshape(t, 1, 64).view(torch.int16), want)
    nan = torch.full((1, 1, 64), float("nan"))
    rvv.write_kv(nan, nan, cache, torch.tensor([0]))
    assert cache[0, 0].isnan().all()
    # and back: half -> float32 is exact (a half key written into a float32 cache)
    halves = cache[1].reshape(t, 1, 64)
    wide = torch.zeros(2, t, 1, 1, 64)
    rvv.write_kv(halves, halves, wide, torch.arange(t))
    assert torch.equal(wide[1].reshape(t, 64).view(torch.int32), halves.reshape(t, 64).float().view(torch.int32))


def test_sampler_follows_the_counter_rule(rvv):
    """Seeded draws equal native's: the C port of counter_uniform's bit recipe."""
    g = torch.Generator().manual_seed(1)
    b, v = 64, 1000
    logits = torch.randn(b, v, generator=g) * 3
    params = SamplingTensors(temperature=torch.rand(b, generator=g) + 0.5, top_k=torch.zeros(b, dtype=torch.int32),
                             top_p=torch.ones(b), min_p=torch.zeros(b),
                             seeds=torch.randint(-2 ** 62, 2 ** 62, (b,), generator=g),
                             steps=torch.randint(0, 2 ** 40, (b,), generator=g), all_random=True)
    assert torch.equal(rvv.sample(logits, params), sample_random(logits, params))


def test_linear_and_decode_attention_are_batch_invariant(rvv):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 257, generator=g)
    w = rvv.pack_weight(torch.randn(129, 257, generator=g), "int8")
    full = rvv.linear(x, w)
    assert all(torch.equal(rvv.linear(x[i:i + 1], w), full[i:i + 1]) for i in (0, 17, 36))
    hq, hk, d, bs, nblk = 8, 2, 64, 16, 12
    cache = torch.randn(2, nblk, bs, hk, d, generator=g)
    lens = [5, 40, 77]
    tables = torch.tensor([[0, 0, 0, 0, 0], [1, 2, 3, 0, 0], [4, 5, 6, 7, 8]], dtype=torch.int32)
    q = torch.randn(3, hq, d, generator=g)

    def meta(rows):
        ls = [lens[r] for r in rows]
        return AttentionMetadata(torch.arange(len(rows) + 1, dtype=torch.int32), torch.tensor(ls, dtype=torch.int32),
                                 tables[rows], torch.zeros(len(rows), dtype=torch.int64), 1, max(ls),
                                 [1] * len(rows), ls, bs, num_decode_seqs=len(rows))

    batch = rvv.attention(q, cache, meta([0, 1, 2]), 0.125)
    for r in range(3):
        assert torch.equal(rvv.attention(q[r:r + 1], cache, meta([r]), 0.125), batch[r:r + 1])
    ref = NativeBackend().attention(q, cache, meta([0, 1, 2]), 0.125)
    assert torch.allclose(batch, ref, atol=1e-5)


def test_no_compiler_is_a_clear_probe_reason(monkeypatch):
    monkeypatch.setattr(cbuild, "find_compiler", lambda: None)
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    monkeypatch.delenv("HALSERVE_RISCV_RVV_LIB", raising=False)
    res = RvvBackend.probe()
    assert res.score == 0 and "no C compiler" in res.reason


@pytest.mark.parametrize("preset", ["mistral", "qwen3_moe"])
def test_greedy_decode_matches_native(tmp_path, preset):
    """The engine tier: every op of a forward pass in C (sliding window, one KV head, MoE),
    token for token against native in float32 (native is held to transformers in
    tests/engine)."""
    from halserve import LLM, SamplingParams
    from tests.engine.test_engine import PARITY, PROMPTS
    from tests.helpers.checkpoints import make_checkpoint

    path = make_checkpoint(preset, tmp_path / preset)
    params = SamplingParams(temperature=0.0, max_tokens=PARITY.max_tokens, min_tokens=PARITY.min_tokens)
    got = {}
    for name in ("riscv_rvv", "native"):
        llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32, backend=name)
        assert llm.engine.hal.name == name
        got[name] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert got["riscv_rvv"] == got["native"]


@pytest.mark.parametrize("isa, score", [("rv64imafdcv_zicsr_zvfh", 50), ("rv64gc_zve64x_v", 50),
                                        ("rv64imafdc_zicsr", 20)])
def test_probe_on_riscv64_reads_the_isa_line(monkeypatch, isa, score):
    import builtins
    import io

    real_open = builtins.open
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: io.StringIO(f"processor\t: 0\nisa\t\t: {isa}\n")
                        if path == "/proc/cpuinfo" else real_open(path, *a, **k))
    res = RvvBackend.probe()
    assert res.score == score and res.score > NativeBackend.probe().score, res
