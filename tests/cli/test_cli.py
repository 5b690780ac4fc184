"""The CLI as a user runs it: probe, generate, and one-line errors without tracebacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.checkpoints import make_checkpoint


def halserve(*args, timeout=120):
    # as a user runs it: not under the Triton interpreter other test modules switch on
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "halserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_probe_names_native_with_reasons():
    r = halserve("probe", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    text = json.dumps(data)
    assert "native" in text
    r = halserve("probe")
    assert r.returncode == 0
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
    rows = {n: lines[n] for n in ("cuda", "rocm", "cpu_amx", "riscv_rvv", "native")}
    chosen = [n for n, ln in rows.items() if " * " in ln]
    assert len(chosen) == 1, rows  # exactly one backend is chosen (native only where nothing scores higher)
    best = max(rows, key=lambda n: int(rows[n].split()[1]))
    assert int(rows[chosen[0]].split()[1]) == int(rows[best].split()[1])
    for name, ln in rows.items():
        assert len(ln.split()) > 2  # every backend has a reason


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("cli"))


def test_generate_matches_llm(ckpt):
    from halserve import LLM, SamplingParams

    r = halserve("generate", str(ckpt), "--prompt", "the cat", "--max-tokens", "12", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    want = LLM(str(ckpt), dtype="float32").generate(["the cat"], SamplingParams(temperature=0, max_tokens=12))
    assert r.stdout.rstrip("\n") == "the cat" + want[0].outputs[0].text
    assert "backend" in r.stderr  # the start-up line names the backend


@pytest.mark.parametrize("args, needle", [
    (["generate", "/no/such/dir"], "not a directory"),
    (["generate", "{ckpt}", "--temperature", "-1"], "temperature"),
    (["generate", "{ckpt}", "--dtype", "int3"], "dtype"),
    (["generate", "{ckpt}", "--backend", "rocm"], "rocm"),  # no ROCm torch here: refused in one line
    (["generate", "{ckpt}", "--kv-offload-dir", "{ckpt}/kv", "--kv-offload-disk-size", "0"], "kv_offload_disk_bytes"),
    # a host backend has nothing to overlap a step with: asking for async scheduling is refused
    (["generate", "{ckpt}", "--backend", "native", "--async-scheduling", "--prompt", "x"], "async_scheduling"),
    (["generate", "{ckpt}", "--quantize-lm-head", "--prompt", "x"], "quantize_lm_head"),  # without --quantization
])
def test_errors_are_one_line(ckpt, args, needle):
    r = halserve(*[a.format(ckpt=ckpt) for a in args])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and needle in err[0]


def test_offload_flags_map_to_engine_arguments(tmp_path):
    import argparse

    from halserve.generate_cli import add_engine_arguments, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    kw = engine_kwargs(p.parse_args(["m", "--kv-offloading-size", "1.5", "--kv-offload-dir", str(tmp_path),
                                     "--kv-offload-disk-size", "0.25"]))
    assert (kw["kv_offload_host_bytes"], kw["kv_offload_dir"], kw["kv_offload_disk_bytes"]) == (
        3 << 29, str(tmp_path), 1 << 28)
    assert "kv_offload_dir" not in engine_kwargs(p.parse_args(["m"]))
    assert engine_kwargs(p.parse_args(["m", "--quantization", "int8", "--quantize-lm-head"]))["quantize_lm_head"] is True
    assert engine_kwargs(p.parse_args(["m"]))["quantize_lm_head"] is False
