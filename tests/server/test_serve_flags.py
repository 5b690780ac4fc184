"""``halserve serve`` flags: checked before anything loads (one line, no traceback), the port
range, loopback by default, and a warning when serving beyond loopback without a key."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from halserve.config import ConfigError, EngineConfig
from tests.server.server_proc import ROOT


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("HALSERVE_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "halserve.cli", "serve", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["--port", "99999"], "99999"),
    (["--port", "-1"], "-1"),
    (["--kv-cache-dtype", "fp8_e5m2"], "kv_cache_dtype='fp8_e5m2'"),
    (["--kv-cache-dtype", "bfloat16"], "kv_cache_dtype='bfloat16'"),
    (["--max-num-seqs", "0"], "max_num_seqs=0"),
    (["--kv-cache-memory", "0"], "kv_cache_memory=0"),
    (["--max-request-body-mb", "0"], "'0'"),
])
def test_bad_flags_fail_before_loading(args, needle):
    r = serve(*args, "--port", "0") if "--port" not in args else serve(*args)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and needle in out, out
    assert "serve: loading" not in out and "Traceback" not in out, out


def test_kv_cache_dtype_values():
    assert EngineConfig(kv_cache_dtype="auto").kv_cache_dtype == "auto"
    assert EngineConfig(dtype="bfloat16", kv_cache_dtype="bf16").kv_cache_dtype == "bf16"
    assert EngineConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"  # e4m3: docs/kv_cache_fp8.md
    for kw in (dict(kv_cache_dtype="fp8_e5m2"), dict(kv_cache_dtype="int8"),
               dict(dtype="float32", kv_cache_dtype="float16")):
        with pytest.raises(ConfigError, match="kv_cache_dtype"):
            EngineConfig(**kw)


def test_defaults_loopback_and_warns_beyond_it(tmp_path):
    from halserve.server.cli import _is_loopback, add_arguments

    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).host == "127.0.0.1"
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.1.2.3")
    # beyond loopback without a key: warned before loading (a busy port then stops it early)
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        r = serve("--host", "0.0.0.0", "--port", str(busy.getsockname()[1]))
    assert r.returncode != 0 and "beyond loopback without --api-key" in r.stderr, r.stderr
    assert "serve: loading" not in r.stderr


def test_startup_progress_has_no_partial_load_time(capsys):
    """The loader times only its own part (weights map lazily); the progress line's elapsed
    column is the one true figure, so the line carries no second, smaller 'in X s'."""
    import logging

    from halserve.server.cli import _LoadLog

    rec = logging.LogRecord("halserve", logging.INFO, __file__, 1, "loaded %s (%s) dtype=%s in %.2fs",
                            ("m", "LlamaForCausalLM", "float32", 0.03), None)
    _LoadLog().emit(rec)
    err = capsys.readouterr().err
    assert "loaded m (LlamaForCausalLM) dtype=float32" in err and "0.03" not in err
