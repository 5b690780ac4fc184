"""cpu_amx's C kernels out of memory (linear, attention, sample): a scratch malloc that fails
is a one-line MemoryError naming the op, never a segfault or an abort. A child process caps
its address space (RLIMIT_AS) just above what it uses, then asks for more scratch than the
cap leaves."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.hal.test_cpu_amx import pytestmark  # noqa: F401 (the skip mark)

_CHILD = r"""
import resource, sys, torch
from halserve.hal.cpu_amx.backend import CpuAmxBackend
from halserve.hal.conformance import sampling_tensors
from tests.hal.test_cpu_amx import _meta

b = CpuAmxBackend()
# the OpenMP pool and every op's first scratch exist before the cap
b.linear(torch.randn(1, 64).bfloat16(), b.pack_weight(torch.randn(8, 64)))
k = 1 << 24  # bf16 x of 32 MB, float32 W of 64 MB: the kernel's float32 copy of x needs 64 MB more
x, pw = torch.randn(1, k).bfloat16(), b.pack_weight(torch.randn(1, k))
hk, d, ctx = 8, 64, 1 << 22  # two decode rows over 4M keys: ~140 MB of span states
meta, _ = _meta([ctx, ctx], [1, 1])
meta.block_tables = torch.zeros_like(meta.block_tables)  # every block is block 0: a tiny cache
cache, q = torch.randn(2, 1, 16, hk, d), torch.randn(2, hk, d)
v = 1 << 24  # 64 MB of logits: the sampler's row scratch needs 64 MB + its candidates more
logits, greedy = torch.randn(1, v), sampling_tensors(1, 0.0)
b.sample(torch.randn(1, 64), greedy)
one, _ = _meta([40, 40], [1, 1])
one.block_tables = torch.zeros_like(one.block_tables)
b.attention(q, cache, one, 0.125)
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (48 << 20), resource.RLIM_INFINITY))
for op, call in (("linear", lambda: b.linear(x, pw)), ("attention", lambda: b.attention(q, cache, meta, 0.125)),
                 ("sample", lambda: b.sample(logits, greedy))):
    try:
        call()
        print(op, "ran")
    except MemoryError as e:
        print(op, "MemoryError", e)
b.linear(torch.randn(1, 64).bfloat16(), b.pack_weight(torch.randn(8, 64)))  # still usable
print("done")
"""


def test_scratch_out_of_memory_is_a_memory_error_naming_the_op():
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", _CHILD], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert lines[-1] == "done", r.stdout
    assert any(ln.startswith("linear MemoryError cpu_amx linear (M=1 K=16777216 N=1): out of memory")
               for ln in lines), r.stdout
    assert any(ln.startswith("attention MemoryError cpu_amx attention (2 query rows") for ln in lines), r.stdout
    assert any(ln.startswith("sample MemoryError cpu_amx sample (1 rows of 16777216") for ln in lines), r.stdout
