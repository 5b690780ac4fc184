"""Every rocm kernel compiles ahead of time for gfx942 (MI300) and gfx950 (MI350) with no AMD
GPU: the Triton kernels as the launchers call them under the CDNA configs, and the Gluon
kernels with their MFMA layouts. The AMDGCN is read: matmul-shaped kernels must use MFMA
instructions and the fp8 kernels the arch's fp8 format (fnuz on gfx942, OCP on gfx950).

HALSERVE_ROCM_AOT_ARCHS (default "gfx942,gfx950") picks the targets."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from halserve.hal.triton import configs  # noqa: E402

ARCHS = [a for a in os.environ.get("HALSERVE_ROCM_AOT_ARCHS", "gfx942,gfx950").split(",") if a]
# top-level Triton kernels of the ops the rocm backend runs (helpers inlined into them are
# not kernels); skinny's weight-streaming kernel is cuda-only (RocmBackend's fp8 linear is
# quantize + the tiled fp8 GEMM)
TRITON_KERNELS = {"_attn_kernel", "_merge_kernel", "_persistent_mm_kernel", "_reduce_kernel", "_fp8_mm_kernel",
                  "_quant_per_token_kernel", "_moe_gemm_kernel", "_rms_norm_kernel", "_rotary_kernel",
                  "_silu_and_mul_kernel", "_write_kv_kernel", "_gumbel_argmax_kernel", "_rotary_write_kv_kernel"}
HELPERS = {"_find_seq", "_tiles", "_span_weights", "_rotate", "_mix32", "_e4m3_byte", "_is_negative", "_quant_a", "_k_steps",
           "_bf16_rne", "_rounded", "_rotated", "_store_kv"}
NOT_ROCM = {"_skinny_kernel"}
GLUON_KERNELS = {"decode_attention_kernel", "fp8_gemm_kernel"}
MATMUL = {"_attn_kernel", "_persistent_mm_kernel", "_fp8_mm_kernel", "_moe_gemm_kernel"} | GLUON_KERNELS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "halserve.hal.rocm.aot", "--json", str(out)]
    for a in ARCHS:
        cmd += ["--arch", a]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"aot compile produced nothing (rc={p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(out.read_text())


def test_kernel_list_is_complete():
    """A new Triton kernel in the shared modules must join the compile list (or be named here)."""
    from triton.runtime.jit import JITFunction

    found = set()
    for mod in ("attention", "matmul", "moe", "elementwise", "sample", "skinny", "fused"):
        m = importlib.import_module(f"halserve.hal.triton.{mod}")
        found |= {n for n, v in vars(m).items() if isinstance(v, JITFunction) or type(v).__name__ == "InterpretedFunction"}
    assert found - HELPERS - NOT_ROCM == TRITON_KERNELS


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(compiled, arch):
    res = compiled[arch]
    bad = [f"{c['scenario']}: {c['kernel']}: {c['error']}" for c in res if not c["ok"]]
    assert not bad, "\n".join(bad)
    assert {c["kernel"] for c in res} == TRITON_KERNELS | GLUON_KERNELS


@pytest.mark.parametrize("arch", ARCHS)
def test_matmul_kernels_use_mfma(compiled, arch):
    for c in compiled[arch]:
        if c["kernel"] in MATMUL:
            assert c["mfma"], f"{c['scenario']}: {c['kernel']} has no v_mfma_* instruction"
        else:
            assert not c["mfma"], f"{c['kernel']} is not matmul-shaped but uses {c['mfma']}"


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_is_the_arch_format(compiled, arch):
    fnuz = configs.CDNA[arch]["fp8"] == "e4m3fnuz"
    want = "f8E4M3FNUZ" if fnuz else "f8E4M3FN"
    fp8 = [c for c in compiled[arch] if c["fp8_types"]]
    assert {c["kernel"] for c in fp8} >= {"_fp8_mm_kernel", "_quant_per_token_kernel", "_moe_gemm_kernel",
                                          "fp8_gemm_kernel"}
    for c in fp8:
        assert c["fp8_types"] == [want], f"{c['scenario']}: {c['kernel']} uses {c['fp8_types']}"
        # gfx950's OCP conversions are the scalef32 forms; gfx942's v_cvt_*fp8* are fnuz
        scaled = [i for i in c["fp8_cvt"] if "scalef32" in i]
        assert bool(scaled) != fnuz or not c["fp8_cvt"], f"{c['kernel']}: {c['fp8_cvt']}"
        if "W8A8" in c["scenario"] and c["kernel"] in ("_fp8_mm_kernel", "fp8_gemm_kernel"):
            fp8_mfma = [i for i in c["mfma"] if "fp8_fp8" in i or "f8f6f4" in i]
            assert fp8_mfma, f"{c['scenario']}: fp8 x fp8 GEMM without an fp8 MFMA: {c['mfma']}"
    quant = [c for c in fp8 if c["kernel"] == "_quant_per_token_kernel"]
    assert quant and all(c["fp8_cvt"] for c in quant), "activation quantization emitted no fp8 conversion"


@pytest.mark.parametrize("arch", ARCHS)
def test_configs_fit_lds_and_carry_hip_options(compiled, arch):
    fam = configs.CDNA[arch]["family"]
    for c in compiled[arch]:
        assert c["lds_bytes"] <= configs.CDNA[arch]["lds"], f"{c['kernel']} needs {c['lds_bytes']} B of LDS"
    attn = [c for c in compiled[arch] if c["kernel"] == "_attn_kernel" and "decode" in c["scenario"]]
    want = configs.ATTN_DECODE[fam]
    assert attn and all(attn[0]["options"][k] == want[k] for k in configs.HIP_OPTIONS + ("num_warps", "num_stages"))


_BACKEND_SCRIPT = """
import json, sys
from halserve.hal.rocm.aot import backend_launches
print(json.dumps({a: backend_launches(a) for a in sys.argv[1:]}))
"""


def test_backend_ops_take_the_arch_configs():
    """RocmBackend's ops hand the launchers its arch's CDNA configs (not the device's, which a
    CPU does not have: without forced_arch, arch() would ask torch.cuda and fail)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", _BACKEND_SCRIPT, "gfx942", "gfx950"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for arch, fam in (("gfx942", "cdna3"), ("gfx950", "cdna4")):
        k = got[arch]
        attn = configs.ATTN[fam]
        assert k["_attn_kernel"]["BLOCK_N"] == attn["block_n"] and k["_attn_kernel"]["num_stages"] == attn["num_stages"]
        with configs.forced_arch(arch):
            fp8 = configs.fp8_matmul_config(256, 4096, 4096)
            moe = configs.moe_config(600)
        assert {x: k["_fp8_mm_kernel"][x] for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")} == \
            {x: fp8[x] for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")}
        assert k["_moe_gemm_kernel"]["BLOCK_K"] == moe["BLOCK_K"]
        # not on a HIP device: the HIP-only options stay out of the launch
        assert not set(configs.HIP_OPTIONS) & set(k["_attn_kernel"])
    assert got["gfx942"]["_attn_kernel"]["BLOCK_N"] != got["gfx950"]["_attn_kernel"]["BLOCK_N"]
    assert got["gfx942"]["_fp8_mm_kernel"]["BLOCK_K"] != got["gfx950"]["_fp8_mm_kernel"]["BLOCK_K"]
