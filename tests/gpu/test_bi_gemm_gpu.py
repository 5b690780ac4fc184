"""The batch-invariant GEMM's prefill-size form (configs.BI_LARGE_M: a bigger row tile, the
same BLOCK_K and split count) must give every row the bits of the decode form, on the 8B
projection shapes; otherwise a prompt's logits would depend on its batch's size."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_large_row_tile_keeps_row_bits(n, k):
    from halserve.hal.triton import configs
    from halserve.hal.triton import matmul as mm

    fam = configs._family(configs.arch())
    over = configs.BI_LARGE_M.get(fam) or dict(BLOCK_M=128, num_warps=8, num_stages=3)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    base = configs.matmul_fixed_config(n, k)
    want = mm.persistent_matmul(x, w, cfg=base)
    assert torch.equal(mm.persistent_matmul(x, w, cfg=dict(base, **over)), want)
    assert torch.equal(mm.persistent_matmul(x, w), want)  # whatever form 300 rows get now
    assert torch.equal(mm.persistent_matmul(x[:1].contiguous(), w), want[:1])
