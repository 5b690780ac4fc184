"""The weight-streaming GEMM (hal/triton/skinny.py) on the GPU at decode shapes: every inner
loop / reduction / quantization form against a float64 reference, the fused split reduction
bitwise equal to the two-kernel one (the arrival counters' memory ordering), the fused form
replayed from a CUDA graph (the counters re-arm themselves), and the tuned table's configs on
the shapes they were chosen for, eager and replayed from a graph as the engine runs them."""
from __future__ import annotations

import pytest
import torch

from halserve.hal.quant import quantize

CFGS = [dict(KIND=k, BLOCK_N=bn, BLOCK_K=bk, SPLITS=sp, FUSED=f, QUANT_IN=q, num_warps=4, num_stages=ns)
        for k, bn, bk, ns in (("gemv", 32, 256, 1), ("gemvr", 32, 512, 1), ("dot", 64, 256, 4))
        for sp, f, q in ((1, False, True), (8, False, False), (8, True, True))]
# the CUDA-core loops at 1-3 rows (at 16 they would hold a 16 x BLOCK_N x BLOCK_K product in
# registers; no config picks them there), the tensor-core one at 1 and 16 (a padded and a full
# row tile); each (config, rows) is a compile, so the set stays small
FORMS = [(c, m) for c in CFGS for m in {"gemv": (1,), "gemvr": (1, 3), "dot": (1, 16)}[c["KIND"]]]
SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _name(c):
    return f"{c['KIND']}-sp{c['SPLITS']}-fused{int(c['FUSED'])}-qin{int(c['QUANT_IN'])}"


def _case(m, n=1000, k=4096 + 96, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    q, s = quantize(w, "fp8", "per_channel")
    return x, q, s


def _ref(x, q, s, bias=None):
    from halserve.hal.triton import matmul as mm

    xq, xs = mm.quant_fp8_per_token(x)
    ref = (xq.double() * xs.double()[:, None]) @ (q.double() * s.double().reshape(-1)[:, None]).T
    return ref + bias.double() if bias is not None else ref


def _nmse(got, ref):
    return float(((got.double() - ref) ** 2).sum() / (ref ** 2).sum())


@pytest.mark.parametrize("cfg,m", FORMS, ids=[f"{_name(c)}-m{m}" for c, m in FORMS])
def test_skinny_fp8_forms_match_reference(cfg, m):
    from halserve.hal.triton.skinny import skinny_matmul

    x, q, s = _case(m)
    bias = torch.randn(q.shape[0], device="cuda", dtype=torch.bfloat16)
    err = _nmse(skinny_matmul(x, q, s, "per_token", bias, cfg=cfg), _ref(x, q, s, bias))
    assert err < 1e-4, f"nmse {err:.3g}"


@pytest.mark.parametrize("kind", ["gemv", "gemvr", "dot"])
def test_skinny_fused_reduction_bitwise_and_graph_replay(kind):
    from halserve.hal.triton.skinny import skinny_matmul

    x, q, s = _case(2, n=6144, k=4096, seed=1)
    base = dict(KIND=kind, BLOCK_N=32 if kind != "dot" else 64, BLOCK_K=256, SPLITS=8, QUANT_IN=True, num_warps=4,
                num_stages=1 if kind != "dot" else 4)
    two = skinny_matmul(x, q, s, "per_token", cfg=dict(base, FUSED=False))
    for _ in range(3):
        assert torch.equal(skinny_matmul(x, q, s, "per_token", cfg=dict(base, FUSED=True)), two)
    xs = x.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = skinny_matmul(xs, q, s, "per_token", cfg=dict(base, FUSED=True))
    for seed in (2, 3, 4):
        x2, _, _ = _case(2, n=8, k=4096, seed=seed)
        xs.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, skinny_matmul(x2, q, s, "per_token", cfg=dict(base, FUSED=False)))


@pytest.mark.parametrize("shape", list(SHAPES_8B))
@pytest.mark.parametrize("m", [1, 4, 16])
def test_skinny_tuned_configs_eager_and_in_graphs(shape, m):
    """What the cuda backend runs at decode (configs.skinny_config on the 8B shapes): right
    against float64, and a CUDA graph of it replayed on new rows gives the eager bits."""
    from halserve.hal.triton.skinny import skinny_matmul

    n, k = SHAPES_8B[shape]
    x, q, s = _case(m, n=n, k=k, seed=6)
    err = _nmse(skinny_matmul(x, q, s, "per_token"), _ref(x, q, s))
    assert err < 1e-4, f"nmse {err:.3g}"
    xs = x.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = skinny_matmul(xs, q, s, "per_token")
    for seed in (7, 8):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x2 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        xs.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, skinny_matmul(x2, q, s, "per_token"))


BF16_FORMS = [(dict(c, QUANT_IN=False), 1) for c in CFGS if c["SPLITS"] > 1 and c["KIND"] != "gemv"]


@pytest.mark.parametrize("cfg,m", BF16_FORMS, ids=[f"{_name(c)}-m{m}" for c, m in BF16_FORMS])
def test_skinny_bf16_forms_match_reference(cfg, m):
    """The 16-bit form the cuda backend may route few-row linears to (configs.skinny_bf16_config)."""
    from halserve.hal.triton.skinny import skinny_matmul

    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(m, 2048 + 32, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(3000, 2048 + 32, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    bias = torch.randn(3000, device="cuda", dtype=torch.bfloat16, generator=g)
    cfg = dict(cfg, BLOCK_K=128)
    ref = x.double() @ w.double().T + bias.double()
    got = skinny_matmul(x, w, bias=bias, cfg=cfg).double()
    err = ((got - ref) ** 2).sum() / (ref ** 2).sum()
    assert err < 1e-4, f"nmse {err:.3g}"


@pytest.mark.parametrize("kind", ["gemvr", "dot"])
def test_skinny_pdl_reads_what_the_kernel_before_wrote(kind):
    """Launched as a programmatic dependent (PDL=True), the kernel may start while the one
    before it runs: it must still read that kernel's output (a fresh x written just before),
    eager and replayed from a graph, bitwise what the ordinary launch gives."""
    from halserve.hal.triton.skinny import skinny_matmul

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90+")
    x, q, s = _case(1, n=6144, k=4096, seed=9)
    cfg = dict(KIND=kind, BLOCK_N=16 if kind == "gemvr" else 64, BLOCK_K=512 if kind == "gemvr" else 256, SPLITS=2,
               FUSED=True, QUANT_IN=True, num_warps=4, num_stages=1 if kind == "gemvr" else 4)
    src = x.clone()
    xs = torch.empty_like(x)

    def step():
        torch.mul(src, 3.0, out=xs)  # the writer right before
        return skinny_matmul(xs, q, s, "per_token", cfg=dict(cfg, PDL=True))

    want = skinny_matmul(x * 3.0, q, s, "per_token", cfg=cfg)
    assert torch.equal(step(), want)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = step()
    for seed in (10, 11):
        x2, _, _ = _case(1, n=8, k=4096, seed=seed)
        src.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, skinny_matmul(x2 * 3.0, q, s, "per_token", cfg=cfg))
