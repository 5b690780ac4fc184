"""The batch-invariant GEMM's prefill form adds a tile's K splits inside the program
(SPLITS_INLINE) instead of through fp32 partials and the ordered reduction kernel: it must be
the same operations in the same order, so bitwise the same output, or a prompt's rows would
change with its batch's size (the large form serves M >= BI_LARGE_M_ROWS only). On the CPU
under TRITON_INTERPRET=1 (or on a GPU when there is one)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.triton_here import DEV, ON_GPU  # noqa: E402,F401 (first: it sets the interpreter up)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_inline_splits_are_the_two_kernel_sum(splits, bias):
    from halserve.hal.triton import configs
    from halserve.hal.triton.matmul import persistent_matmul

    g = torch.Generator().manual_seed(splits)
    m, n, k = 37, 40, 160  # partial row and column tiles; K splits that end mid-tile
    x = torch.randn(m, k, generator=g).to(DEV)
    w = torch.randn(n, k, generator=g).to(DEV)
    b = torch.randn(n, generator=g).to(DEV) if bias else None
    cfg = dict(configs.matmul_fixed_config(n, k), SPLITS=splits)
    two = persistent_matmul(x, w, b, cfg=cfg)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert ((two.double() - ref) ** 2).sum() / (ref ** 2).sum() < 1e-10
    out = torch.full_like(two, float("nan"))  # a tile the inline form skips must show
    assert torch.equal(persistent_matmul(x, w, b, out=out, cfg=dict(cfg, SPLITS_INLINE=True)), two)


def test_large_form_rows_keep_their_bits(monkeypatch):
    """With a large-row form in the table (here a stand-in for the interpreter: another tile,
    the splits inline), a row at M >= BI_LARGE_M_ROWS has the bits it has alone."""
    from halserve.hal.triton import configs
    from halserve.hal.triton.matmul import persistent_matmul

    monkeypatch.setitem(configs.BI_LARGE_M, configs.arch(), dict(BLOCK_M=32, SPLITS_INLINE=True))
    monkeypatch.setattr(configs, "BI_LARGE_M_ROWS", 40)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(70, 128, generator=g).to(DEV)
    w = torch.randn(24, 128, generator=g).to(DEV)
    assert configs.matmul_fixed_config(24, 128, 70)["BLOCK_M"] == 32
    full = persistent_matmul(x, w)
    for i in (0, 33, 69):
        assert torch.equal(persistent_matmul(x[i:i + 1].contiguous(), w), full[i:i + 1]), f"row {i}"
