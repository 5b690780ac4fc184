"""The skinny GEMM's in-kernel activation amax (QUANT_IN, hal/triton/skinny.py) over rows
longer than one amax step (4096 columns): the default fp8 decode form at batch 1 on sm_90
(configs.SKINNY_TUNED / SKINNY_RULE: gemv with QUANT_IN) quantizes inside the kernel, and
at K = 8192 / 14336 / 28672 the amax takes several steps. The largest value of a row is put
past the first step, in one row of several (per token) and in a row other than the first
(per tensor): an amax that read one step or one row would clamp it and miss by far.
On the CPU under TRITON_INTERPRET=1 (or on a GPU when there is one)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.triton_here import DEV, ON_GPU  # noqa: E402,F401 (first: it sets the interpreter up)

from halserve.hal.native import NativeBackend  # noqa: E402

K = 4096 + 40  # two amax steps, the second ragged


def _nmse(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).sum() / b.pow(2).sum())


@pytest.mark.parametrize("kind", ["gemv", "gemvr", "dot"])
@pytest.mark.parametrize("scheme,m,big_row", [("fp8", 3, 1), ("fp8_per_tensor", 2, 1), ("fp8", 1, 0)])
def test_in_kernel_amax_reads_every_column_step_and_row(kind, scheme, m, big_row):
    from halserve.hal.triton.skinny import skinny_matmul

    native = NativeBackend(DEV)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(m, K, generator=g)
    x[big_row, K - 3] = 60.0  # the row's amax, in the second step only
    x = x.to(torch.bfloat16).to(DEV)
    w = native.pack_weight((torch.randn(9, K, generator=g) * 0.05).bfloat16().to(DEV), scheme)
    cfg = dict(KIND=kind, BLOCK_N=16, BLOCK_K=512, SPLITS=1, FUSED=False, QUANT_IN=True, num_warps=4, num_stages=1)
    got = skinny_matmul(x, w.weight, w.scale, w.act_scheme, cfg=cfg)
    assert _nmse(got, native.linear(x, w)) < 1e-3
