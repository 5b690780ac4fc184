"""Review regressions (issue 22, session 4): cpu_amx decode graphs and kernels on inputs the
other cpu_amx tests do not reach."""
from __future__ import annotations

import pytest
import torch

from halserve import LLM, SamplingParams

from tests.hal.test_cpu_amx import pytestmark  # noqa: F401 (its skip mark: an x86-64 CPU with AVX2 and FMA)
from tests.hal.test_cpu_amx_graph import replays_match_step


@pytest.mark.parametrize("quant,max_num_seqs", [("int4", 2), ("int8_w8a8", 1), (None, 16)])
def test_moe_graphs_never_replay_a_host_split(checkpoint, quant, max_num_seqs):
    """MoE steps that leave the fused C kernel (int4 / W8A8 experts at any batch; a bucket past
    the fused kernel's token limit: Mixtral preset, 4 experts, top 2: 8 tokens, bucket 16)
    split the pairs by expert with host counts (``.tolist()``, unseen by the dispatch mode):
    such a step is not captured; whatever is captured replays its step function bitwise, and
    the engine's tokens are the eager engine's."""
    path = str(checkpoint("mixtral"))
    kw = dict(backend="cpu_amx", dtype="bfloat16", quantization=quant, max_num_seqs=max_num_seqs)
    g = LLM(path, **kw)
    if not g.engine.runner.graphs:
        why = g.engine.hal.graph_refusal
        assert "moe did not run as one fused C kernel call" in why or "Tensor.tolist()" in why, why
    replays_match_step(g)
    prompts = [[3 + i, 17, 42 + 2 * i, 9] for i in range(max(2, max_num_seqs - 4))]
    sp = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    ref = [(o.outputs[0].token_ids, o.outputs[0].logprobs)
           for o in LLM(path, enforce_eager=True, **kw).generate(prompts, sp)]
    assert [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in g.generate(prompts, sp)] == ref


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.bfloat16), ("int8_w8a8", torch.float32),
                                          ("int8_w8a8", torch.bfloat16)])
@pytest.mark.parametrize("m", [1, 2, 5])  # one-row / four-row VPDPBUSD, AMX int8 tiles (amx tier)
def test_a_nan_in_x_makes_its_row_nan_through_the_int8_kernels(scheme, dtype, m):
    """The int8 kernels quantize x per row (amax by fmaxf, which skips NaN): a NaN or inf in x
    must not come out as finite numbers (native's dequantize-then-GEMM gives NaN/inf); the
    other rows keep their bits."""
    from tests.hal.test_cpu_amx import RUNNABLE, backend

    g = torch.Generator().manual_seed(0)
    for tier in RUNNABLE:
        b = backend(tier)
        pw = b.pack_weight(torch.randn(40, 200, generator=g), scheme)
        x = torch.randn(m, 200, generator=g).to(dtype)
        clean = b.linear(x, pw)
        for bad in (float("nan"), float("inf")):
            xb = x.clone()
            xb[m - 1, 3] = bad
            y = b.linear(xb, pw)
            assert not y[m - 1].float().isfinite().any(), (tier, bad)
            assert torch.equal(y[:m - 1], clean[:m - 1]), tier


def test_a_nan_in_x_makes_its_token_nan_through_the_int8_moe_kernel():
    """moe.c's int8 x bf16 path (16-bit fixed point x and activations) likewise."""
    from tests.hal.test_cpu_amx import RUNNABLE, backend
    from tests.hal.test_cpu_amx_moe import call, weights

    g = torch.Generator().manual_seed(0)
    for tier in RUNNABLE:
        b = backend(tier)
        w13, w2 = (b.pack_weight(w, "int8") for w in weights(torch.bfloat16))
        x = torch.randn(3, w13.weight.shape[-1], generator=g).bfloat16()
        ids = torch.tensor([[0, 1], [2, 3], [4, 5]])  # no expert shared: the clean tokens keep their bits
        tw = torch.full((3, 2), 0.5)
        clean = call(b, x, tw, ids, w13, w2)
        xb = x.clone()
        xb[2, 3] = float("nan")
        y = call(b, xb, tw, ids, w13, w2)
        assert y[2].isnan().all(), tier
        assert torch.equal(y[:2], clean[:2]), tier


def test_capture_refuses_tolist_and_numpy():
    """``.tolist()`` / ``.numpy()`` read data with no aten op the dispatch mode sees: refused
    by name, and the methods are torch's own again after the capture."""
    from halserve.hal.cpu_amx.backend import CpuAmxBackend

    hal = CpuAmxBackend()
    x = torch.randn(4, 8)
    for read in (lambda t: t.tolist(), lambda t: t.numpy()):
        def step(read=read):
            n = int(read(x.abs().argmax(-1))[0])
            return x[:, :n + 1].sum(-1)

        assert hal.capture_graph(step) is None and "reads data on the host" in hal.graph_refusal
    assert x[0].tolist() == [float(v) for v in x[0]] and x.numpy().shape == (4, 8)


def test_moe_with_no_tokens_returns_an_empty_result():
    """Zero tokens: an empty [0, H] result, not an 'out of memory' error (malloc(0) may be NULL)."""
    from halserve.hal.cpu_amx.backend import CpuAmxBackend
    from halserve.hal.interface import MoeSpec

    hal = CpuAmxBackend()
    for scheme, dtype in (("none", torch.bfloat16), ("int8", torch.bfloat16), ("none", torch.float32)):
        w13 = hal.pack_weight(torch.randn(4, 64, 32).to(dtype), scheme)
        w2 = hal.pack_weight(torch.randn(4, 32, 32).to(dtype), scheme)
        y = hal.moe(torch.empty(0, 32, dtype=dtype), torch.empty(0, 4, dtype=dtype), w13, w2, MoeSpec(top_k=2))
        assert y.shape == (0, 32) and y.dtype == dtype
