"""The batch-invariant GEMM's prefill-size form (configs.BI_LARGE_M: a bigger output tile and
more warps, the same BLOCK_K and split count) must give every row the bits of the decode
form, on the 8B projection shapes; otherwise a prompt's logits would depend on its batch's
size. A row is compared at M = 1, 64 (decode form), 300 and 4096 (the large form, with the
tail tile part empty at 300)."""
from __future__ import annotations

import pytest
import torch

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o (split-K), gate_up, down
# the faster form not yet in BI_LARGE_M (BLOCK_N 128 on every shape): checked here whatever the
# table holds, so it can be proven on the H200 before it is enabled
CANDIDATE = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, SPLITS_INLINE=True)


def _large_form():
    from halserve.hal.triton import configs

    return configs.BI_LARGE_M.get(configs.arch()) or configs.BI_LARGE_M.get(configs._family(configs.arch()))


@pytest.mark.parametrize("n,k", SHAPES)
def test_large_row_tile_keeps_row_bits(n, k):
    from halserve.hal.triton import configs
    from halserve.hal.triton import matmul as mm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    base = configs.matmul_fixed_config(n, k)
    want = mm.persistent_matmul(x, w, cfg=base)
    forms = {"bm128_w8_decode_bn": dict(BLOCK_M=128, num_warps=8, num_stages=3), "in_table": _large_form() or {}}
    bad = [name for name, over in forms.items()
           if not torch.equal(mm.persistent_matmul(x, w, cfg=dict(base, **over)), want)]
    assert not bad, f"forms that change a row's bits: {bad}"
    assert torch.equal(mm.persistent_matmul(x, w), want)  # whatever form 300 rows get now
    assert torch.equal(mm.persistent_matmul(x[:1].contiguous(), w), want[:1])


@pytest.mark.parametrize("n,k", SHAPES)
def test_row_bits_at_m_1_64_4096(n, k):
    """The default path at each row count (the large form engages at 4096 where the table has
    it): a row's bits are those of the row alone."""
    from halserve.hal.triton import configs
    from halserve.hal.triton import matmul as mm

    large = _large_form()
    if large:
        assert configs.matmul_fixed_config(n, k, 4096) != configs.matmul_fixed_config(n, k, 64)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    full = mm.persistent_matmul(x, w)
    ref = x[:8].float() @ w.float().T
    assert (full[:8].float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert torch.equal(mm.persistent_matmul(x[:64].contiguous(), w), full[:64])
    for i in (0, 1, 63, 64, 127, 2049, 4095):
        assert torch.equal(mm.persistent_matmul(x[i:i + 1].contiguous(), w), full[i:i + 1]), f"row {i}"


def test_batch_invariant_linear_rows_across_m():
    """Through CudaBackend.linear (the route the engine takes), with a bias."""
    from halserve.hal.cuda import CudaBackend

    be = CudaBackend("cuda", batch_invariant=True)
    g = torch.Generator(device="cuda").manual_seed(2)
    n, k = 6144, 4096
    w = be.pack_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16, generator=g)
    full = be.linear(x, w, b)
    assert torch.equal(be.linear(x[:64].contiguous(), w, b), full[:64])
    for i in (0, 300, 4095):
        assert torch.equal(be.linear(x[i:i + 1].contiguous(), w, b), full[i:i + 1]), f"row {i}"


@pytest.mark.parametrize("n,k", SHAPES)
def test_candidate_form_keeps_row_bits(n, k):
    """The faster form not in the table yet (BLOCK_N 128 on every shape, splits inline or as
    partials): a row at M = 4096 must have its bits alone (M = 1) before BI_LARGE_M takes it.
    A failure here says: keep it out of the table."""
    from halserve.hal.triton import configs
    from halserve.hal.triton import matmul as mm

    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    rows = [0, 1, 127, 128, 2049, 4095]
    alone = torch.cat([mm.persistent_matmul(x[i:i + 1].contiguous(), w) for i in rows])
    base = configs.matmul_fixed_config(n, k)
    bad = [name for name, over in (("inline", CANDIDATE), ("partials", dict(CANDIDATE, SPLITS_INLINE=False)))
           if not torch.equal(mm.persistent_matmul(x, w, cfg=dict(base, **over))[rows], alone)]
    assert not bad, f"BLOCK_N 128 forms that change a row's bits: {bad}"
