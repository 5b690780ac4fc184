"""kill -9 while the filesystem KV tier is writing, a torn block file on top, then a restart
on the same directory: no partial file is ever used, and the output is unchanged."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WRITER = r"""
import sys, time
from halserve import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, kv_offload_dir=sys.argv[2])
sp = SamplingParams(temperature=0.0, max_tokens=1)
t0 = time.monotonic()
for i in range(2000):  # bounded: killed long before
    if time.monotonic() - t0 > 90:
        break
    llm.generate([[(7 * i + j) % 500 + 5 for j in range(64)]], sp)
    print("done", i, flush=True)
"""

READER = r"""
import json, sys
from halserve import LLM, SamplingParams
prompts = [[(7 * i + j) % 500 + 5 for j in range(64)] + [3, 4] for i in range(6)]
sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ref = [o.outputs[0].token_ids for o in LLM(sys.argv[1], dtype="float32", enforce_eager=True).generate(prompts, sp)]
llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, kv_offload_dir=sys.argv[2])
got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
print(json.dumps({"ref": ref, "got": got, "stats": llm.get_metrics()["offload"]}, default=str))
"""


def _run_env():
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _block_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]


def test_kill9_during_writes_then_restart(checkpoint, tmp_path):
    ckpt = str(checkpoint("qwen3"))
    d = tmp_path / "kv"
    w = subprocess.Popen([sys.executable, "-c", WRITER, ckpt, str(d)], cwd=ROOT, env=_run_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and w.poll() is None:
            if d.exists() and len(_block_files(d)) >= 24:
                break
            time.sleep(0.05)
        assert w.poll() is None, w.stdout.read()
        os.kill(w.pid, signal.SIGKILL)  # mid-run: writes are queued and in flight
    finally:
        w.kill()
        w.wait(30)
    files = _block_files(d)
    assert len(files) >= 24
    # torn writes on top: every third file cut short (what a rename-less writer would leave)
    for victim in sorted(files)[::3]:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    r = subprocess.run([sys.executable, "-c", READER, ckpt, str(d)], cwd=ROOT, env=_run_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["got"] == out["ref"]
    assert out["stats"]["blocks_loaded"] > 0  # the restart really read the files left behind
    assert out["stats"]["bad_files"] > 0  # and met the torn ones, and used none of them
