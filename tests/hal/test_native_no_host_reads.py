"""Native ops that a GPU backend may fall back to inside a captured CUDA graph must never read a
tensor's value on the host (``.item()``, ``int(t)``, indexing by a 0-dim tensor all become
``aten._local_scalar_dense``, which stream capture forbids). Checked on the CPU by recording
every aten op the call dispatches."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from halserve.hal.native import NativeBackend


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_native_write_kv_reads_nothing_on_the_host(cache_dtype):
    g = torch.Generator().manual_seed(0)
    t, hk, d, bs, nb = 7, 2, 16, 4, 4
    key = torch.randn(t, hk, d, generator=g, dtype=torch.bfloat16)
    val = torch.randn(t, hk, d, generator=g, dtype=torch.bfloat16)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[[0, 3]] = -1  # padded rows, as a captured batch has them
    cache = torch.zeros(2, nb, bs, hk, d).to(cache_dtype)
    mode = HostReads()
    with mode:
        NativeBackend().write_kv(key, val, cache, slots, k_scale=0.5, v_scale=2.0)
    assert mode.reads == [], "write_kv read a tensor value on the host: a CUDA graph cannot capture it"
    assert cache.float().abs().sum() > 0  # it wrote
