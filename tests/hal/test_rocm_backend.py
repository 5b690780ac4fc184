"""RocmBackend without an AMD GPU: the probe says why it is not chosen, arch handling, the
exact e4m3fn -> e4m3fnuz weight conversion, and the Triton kernels under the CDNA configs
through conformance in the Triton interpreter.

HALSERVE_ROCM_CONFORMANCE_OPS (default "attention,moe,linear": the ops whose kernels take
CDNA tile configs) and HALSERVE_ROCM_CONFORMANCE_ARCHS (default "gfx942") size the
interpreter run; "all" runs every op."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from halserve.hal.interface import PackedWeight
from halserve.hal.native import NativeBackend
from halserve.hal.rocm import RocmBackend
from halserve.hal.rocm.backend import to_fnuz

OPS = os.environ.get("HALSERVE_ROCM_CONFORMANCE_OPS", "attention,moe,linear")
ARCHS = os.environ.get("HALSERVE_ROCM_CONFORMANCE_ARCHS", "gfx942").split(",")


def test_probe_says_why_not_here():
    if getattr(torch.version, "hip", None):
        pytest.skip("this torch is a ROCm build")
    r = RocmBackend.probe()
    assert r.score == 0 and "torch.version.hip is None" in r.reason and "ROCm" in r.reason


def test_probe_rocm_build_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = RocmBackend.probe()
    assert r.score == 0 and "no AMD GPU" in r.reason


def test_probe_names_the_arch(monkeypatch):
    class Props:
        gcnArchName = "gfx942:sramecc+:xnack-"
        total_memory = 192 << 30

    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "AMD Instinct MI300X")
    r = RocmBackend.probe()
    assert r.score > 0 and "gfx942" in r.reason and "e4m3fnuz" in r.reason
    Props.gcnArchName = "gfx1100"
    r = RocmBackend.probe()
    assert r.score == 0 and "gfx1100" in r.reason


def test_bad_arch_is_named(monkeypatch):
    monkeypatch.setenv("HALSERVE_ROCM_ARCH", "gfx1100")
    with pytest.raises(ValueError, match="gfx1100"):
        RocmBackend("cpu")
    with pytest.raises(ValueError, match="gfx90a"):
        RocmBackend("cpu", arch="gfx90a")


def test_fp4_refused_by_name():
    b = RocmBackend("cpu", arch="gfx950")
    assert b.supports("linear", dtype="bfloat16", scheme="mxfp4").startswith("refused: FP4")


@pytest.mark.parametrize("act", ["per_token", "none"])
def test_fnuz_conversion_is_exact(act):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(67, 129, generator=g) * torch.logspace(-6, 2, 129)  # reaches fn's subnormals
    w[0, :4] = torch.tensor([0.0, -0.0, 448.0, -1e-9])
    scheme = "fp8" if act == "per_token" else "fp8_weight_only"
    p = NativeBackend("cpu").pack_weight(w, scheme)
    assert (p.weight.view(torch.uint8) == 0x80).any()  # a -0 that fnuz would read as NaN
    q = to_fnuz(p)
    assert q.weight.dtype == torch.float8_e4m3fnuz and q.act_scheme == p.act_scheme
    a = p.weight.float() * p.scale.float().reshape(-1, 1)
    b = q.weight.float() * q.scale.float().reshape(-1, 1)
    assert torch.equal(a, b)


def test_ops_run_under_the_arch_configs():
    """Every op the class defines runs its parent's kernel inside forced_arch(self.arch)."""
    from halserve.hal import interface

    assert RocmBackend.kernel_ops >= {"linear", "attention", "moe", "rms_norm", "sample"}
    for op in RocmBackend.kernel_ops:
        assert op in RocmBackend.__dict__, f"{op} is inherited: it would run with the device's configs"
    assert "attention" in interface.OPS


def _conformance(arch: str, ops: list[str]) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", HALSERVE_ROCM_ARCH=arch)
    cmd = [sys.executable, "-m", "halserve.cli", "conformance", "--backend", "rocm", "--quick", "--json"]
    for op in ops:
        cmd += ["--op", op]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    try:
        return json.loads(p.stdout)[0]["results"]
    except Exception:
        pytest.fail(f"conformance gave no report (rc={p.returncode}):\n{p.stderr[-3000:]}")


@pytest.mark.parametrize("arch", ARCHS)
def test_conformance_in_interpreter(arch):
    from halserve.hal.interface import OPS as ALL

    ops = list(ALL) if OPS == "all" else OPS.split(",")
    res = _conformance(arch, ops)
    assert res and {r["op"] for r in res} == set(ops)
    bad = [f"{r['op']} {r['case']}: {r['status']} {r['detail']}" for r in res if r["status"] not in ("PASS", "REFUSED")]
    assert not bad, "\n".join(bad)
    acc = [r for r in res if r["how"].startswith("accelerated")]
    assert {r["op"] for r in acc} == set(ops) - {"swap_blocks", "copy_blocks"}
