"""``halserve bench startup``: seconds from spawning ``halserve serve`` to its first answered
completion, for the shipped demo model and (``--tinyllama``) a 1.1B-parameter checkpoint.

Each run starts a fresh ``python -m halserve.cli serve MODEL`` on a free port and, from the
moment the process is spawned, polls POST /v1/completions (a 4-token token-id prompt,
max_tokens=1) every 10 ms until one returns 200: the number a user feels, Python start-up,
imports, model load, KV allocation, the server coming up and one forward pass included.
The server's own ``ready ... after X s`` line is reported next to it.

The 1.1B checkpoint is random weights in TinyLlama-1.1B's shape (hidden 2048, 22 layers,
32 heads, 4 KV heads, intermediate 5632, vocab 32000), bf16, written here by
``write_random_llama`` (safetensors, 2 shards) into ``--checkpoint-dir`` on first use and
reused after; it has no tokenizer, which a token-id prompt does not need. Its files are in
the page cache after the first run, so later runs measure a warm start.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINYLLAMA_SHAPE = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
DEFAULT_CKPT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "halserve" / "bench" / \
    "tinyllama-1.1b-random-bf16"
READY = re.compile(r"ready on \S+ .*after ([0-9.]+)s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped demo model)")
    p.add_argument("--tinyllama", action="store_true",
                   help="also measure a random-weight 1.1B Llama (TinyLlama shape, bf16), built on first use")
    p.add_argument("--only-tinyllama", action="store_true", help="measure only the 1.1B checkpoint")
    p.add_argument("--checkpoint-dir", default=str(DEFAULT_CKPT_DIR), help="where the 1.1B checkpoint lives")
    p.add_argument("--runs", type=int, default=3, help="start-ups per model (the median is reported)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for one start-up")
    p.add_argument("--serve-args", default="", help="extra flags for `halserve serve`, as one string")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")


# ---- the 1.1B checkpoint -------------------------------------------------------------------------

def llama_tensor_shapes(hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                        num_key_value_heads: int, intermediate_size: int, vocab_size: int,
                        **_) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM tensor names and shapes (untied embeddings)."""
    head_dim = hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, hidden_size)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden_size,),
            p + "self_attn.q_proj.weight": (hidden_size, hidden_size),
            p + "self_attn.k_proj.weight": (kv, hidden_size),
            p + "self_attn.v_proj.weight": (kv, hidden_size),
            p + "self_attn.o_proj.weight": (hidden_size, hidden_size),
            p + "post_attention_layernorm.weight": (hidden_size,),
            p + "mlp.gate_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": (hidden_size, intermediate_size),
        })
    shapes["model.norm.weight"] = (hidden_size,)
    shapes["lm_head.weight"] = (vocab_size, hidden_size)
    return shapes


def write_random_llama(path: Path, shape: dict | None = None, seed: int = 0, num_shards: int = 2,
                       dtype: str = "bfloat16") -> Path:
    """A random-weight HF Llama checkpoint (config.json, sharded safetensors + index,
    generation_config.json): N(0, 0.02) matrices, norms at 1."""
    import torch
    from safetensors.torch import save_file

    shape = dict(TINYLLAMA_SHAPE if shape is None else shape)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shapes = llama_tensor_shapes(**shape)
    tdtype = getattr(torch, dtype)
    total = sum(_numel(s) for s in shapes.values())
    per_shard = -(-total // num_shards)
    g = torch.Generator().manual_seed(seed)
    shards: list[dict] = [{}]
    filled = 0
    weight_map = {}
    for name, s in shapes.items():
        if filled >= per_shard * len(shards) and len(shards) < num_shards:
            shards.append({})
        t = torch.ones(s) if name.endswith("norm.weight") else torch.randn(s, generator=g).mul_(0.02)
        shards[-1][name] = t.to(tdtype)
        filled += _numel(s)
    n = len(shards)
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    nbytes = total * torch.tensor([], dtype=tdtype).element_size()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": nbytes}, "weight_map": weight_map}, indent=1))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, "attention_bias": False,
              "mlp_bias": False, "initializer_range": 0.02, **shape}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


def _numel(s: tuple[int, ...]) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def ensure_tinyllama(path: Path) -> Path:
    if (path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file():
        return path
    print(f"writing a random 1.1B Llama checkpoint to {path} (once) ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    tmp = path.with_name(path.name + ".partial")
    write_random_llama(tmp)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    print(f"  done in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return path


# ---- one start-up ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answered(port: int) -> bool:
    body = json.dumps({"prompt": [1, 2, 3, 4], "max_tokens": 1, "temperature": 0})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        return conn.getresponse().status == 200
    except (ConnectionError, OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def measure_once(model: str, serve_args: list[str], timeout: float) -> dict:
    port = _free_port()
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "halserve.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--disable-uvicorn-access-log", *serve_args]
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            first = None
            while time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    break
                if _answered(port):
                    first = time.perf_counter() - t0
                    break
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.seek(0)
        text = log.read()
    m = READY.search(text)
    if first is None:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"`{' '.join(cmd)}` gave no answer within {timeout}s (exit {proc.returncode}):\n{tail}")
    return {"first_answer_s": first, "server_ready_s": float(m.group(1)) if m else None,
            "exit_code": proc.returncode}


def measure(label: str, model: str, runs: int, serve_args: list[str], timeout: float) -> dict:
    rows = []
    for i in range(runs):
        r = measure_once(model, serve_args, timeout)
        rows.append(r)
        ready = f", server says ready after {r['server_ready_s']:.2f}s" if r["server_ready_s"] is not None else ""
        print(f"  {label} run {i + 1}/{runs}: first answer after {r['first_answer_s']:.2f}s{ready}",
              file=sys.stderr, flush=True)
    firsts = [r["first_answer_s"] for r in rows]
    return {"label": label, "model": model, "runs": rows, "median_s": statistics.median(firsts),
            "min_s": min(firsts), "max_s": max(firsts)}


def main(args: argparse.Namespace) -> int:
    import shlex

    from halserve.server.cli import demo_model_path

    if args.runs < 1:
        raise ValueError(f"--runs={args.runs} must be >= 1")
    serve_args = shlex.split(args.serve_args)
    targets = []
    if not args.only_tinyllama:
        model = args.model or str(demo_model_path())
        targets.append(("demo model" if args.model is None else Path(model).name, model))
    if args.tinyllama or args.only_tinyllama:
        targets.append(("1.1B Llama (random, bf16)", str(ensure_tinyllama(Path(args.checkpoint_dir)))))
    results = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for label, model in targets:
        results.append(measure(label, model, args.runs, serve_args, args.timeout))
    print(f"{' halserve serve start-up (process start -> first answered request) ':=^78}")
    print(f"{'model':<30}{'median s':>10}{'min s':>9}{'max s':>9}   runs   host load (1 min)")
    for r in results:
        print(f"{r['label']:<30}{r['median_s']:>10.2f}{r['min_s']:>9.2f}{r['max_s']:>9.2f}   {len(r['runs']):>4}"
              f"   {load if load is not None else float('nan'):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "host_load_avg_1m": load, "cpu_count": os.cpu_count(),
                       "python": sys.version.split()[0]}, f, indent=2)
    return 0
