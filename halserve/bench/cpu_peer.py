"""llama.cpp as the CPU peer of ``halserve bench cpu``: convert a safetensors checkpoint to
GGUF with llama.cpp's own converter, quantize, and run llama-bench / llama-batched-bench.

``root`` is an extracted llama.cpp archive (``bin/``) plus its converter (``converter/``),
as in ../shared/peers/llama.cpp/README.md. Random benchmark checkpoints carry no
tokenizer, so a tiny BPE one is written beside a linked copy of the checkpoint; the
converter is run with two run-time shims (a sentencepiece stub it imports before looking
for tokenizer.model, and 'gpt-2' as the pre-tokenizer name of that tiny tokenizer).

Weight repacking: the static AMX build's repacked Q8_0/Q4_0 path dies with SIGILL on
``tilezero`` (an AMX tile instruction) for some shapes, so a run that dies is retried once
with ``--repack 0`` and the row says so."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_SHIM = """import runpy, sys
import conversion.base as b
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# the converter writes these itself; llama-quantize makes the rest from the 16-bit file
CONVERTER_TYPES = ("bf16", "f16", "f32")
BITS = {"bf16": 16, "f16": 16, "f32": 32, "q8_0": 8, "q4_0": 4}


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 8, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))


def convert(root: Path, ckpt: Path, work: Path, outtype: str) -> Path:
    out = work / f"model-{outtype}.gguf"
    if out.is_file():
        return out
    src = work / "hf"
    if not src.is_dir():
        src.mkdir(parents=True)
        for f in ckpt.iterdir():
            if f.is_file() and not f.name.startswith("tokenizer"):
                (src / f.name).symlink_to(f.resolve())
        _tokenizer(src)
    stub = work / "shim"
    stub.mkdir(exist_ok=True)
    (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
    (stub / "run_convert.py").write_text(_SHIM)
    env = dict(os.environ, PYTHONPATH=f"{stub}:{root / 'converter'}")
    tmp = out.with_suffix(".partial")
    cmd = [sys.executable, str(stub / "run_convert.py"), str(root / "converter" / "convert_hf_to_gguf.py"),
           str(src), "--outtype", outtype, "--outfile", str(tmp)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed: {res.stderr.strip().splitlines()[-1:]}")
    tmp.rename(out)
    return out


def quantize(root: Path, src: Path, qtype: str, threads: int) -> Path:
    out = src.with_name(f"model-{qtype}.gguf")
    if not out.is_file():
        tmp = out.with_suffix(".partial")
        res = subprocess.run([str(root / "bin" / "llama-quantize"), str(src), str(tmp), qtype, str(threads)],
                             capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"llama-quantize {qtype} failed ({res.returncode}): {res.stderr.strip()[-200:]}")
        tmp.rename(out)
    return out


def gguf(root: Path, ckpt: Path, kind: str, threads: int, base_dir: "str | None" = None) -> Path:
    """The checkpoint as GGUF of ``kind`` (bf16/f16/f32 by the converter; q8_0/q4_0 quantized
    from an existing 16/32-bit file, else from a new bf16 one)."""
    work = workdir(ckpt, base_dir)
    if kind in CONVERTER_TYPES:
        return convert(root, ckpt, work, kind)
    base = next((work / f"model-{t}.gguf" for t in CONVERTER_TYPES if (work / f"model-{t}.gguf").is_file()), None)
    return quantize(root, base or convert(root, ckpt, work, "bf16"), kind, threads)


def bytes_per_token(root: Path, path: Path, expert_fraction: float = 1.0) -> int:
    """Tensor bytes one decode token reads from a GGUF: everything but the token embedding,
    MoE expert tensors (``*_exps``) at ``expert_fraction`` (top_k / experts)."""
    code = ("import json, sys; from gguf import GGUFReader; r = GGUFReader(sys.argv[1]); "
            "print(json.dumps([(t.name, int(t.n_bytes)) for t in r.tensors]))")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(root / "converter")))
    if res.returncode != 0:
        raise RuntimeError(f"reading {path.name} failed: {res.stderr.strip()[-200:]}")
    total = 0.0
    for name, n in json.loads(res.stdout):
        if name.startswith("token_embd"):
            continue
        total += n * (expert_fraction if "_exps" in name else 1.0)
    return int(total)


def _run(cmd: list[str], no_repack: list[str], timeout: float) -> "tuple[subprocess.CompletedProcess, bool]":
    """Run a llama.cpp tool; if it dies (SIGILL in the AMX repack), once more without repacking."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode == 0:
        return res, True
    res2 = subprocess.run(cmd + no_repack, capture_output=True, text=True, timeout=timeout)
    if res2.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({res.returncode}, then {res2.returncode} without "
                           f"repack): {res2.stderr.strip()[-200:]}")
    return res2, False


def bench(root: Path, path: Path, threads: int, n_gen: int, n_prompt: int = 0, reps: int = 2,
          timeout: float = 600) -> dict:
    """llama-bench: batch-1 generation tokens/s (tg) and, if ``n_prompt``, prompt tokens/s (pp),
    in separate runs: the repack SIGILL hits only some of them, and each keeps repacking if it can."""
    out = {}
    for key, p, n in (("decode", 0, n_gen), ("prefill", n_prompt, 0)):
        if not (p or n):
            continue
        cmd = [str(root / "bin" / "llama-bench"), "-m", str(path), "-t", str(threads), "-p", str(p),
               "-n", str(n), "-r", str(reps), "-o", "json"]
        res, repacked = _run(cmd, ["--repack", "0"], timeout)
        out[f"{key}_tok_s"] = float(json.loads(res.stdout)[0]["avg_ts"])
        out["repack" if key == "decode" else "pp_repack"] = repacked
    return out


def batched_ctx(npls: list[int], npp: int, ntg: int) -> int:
    """A context that holds max(npls) sequences of npp + ntg tokens and divides evenly by each
    sequence count (llama.cpp splits n_ctx by n_seq_max and rounds down)."""
    per = -(-(npp + ntg + 1) // 256) * 256
    step = math.lcm(*npls)
    return -(-max(npls) * per // step) * step


def batched(root: Path, path: Path, threads: int, npls: list[int], npp: int, ntg: int,
            timeout: float = 600) -> dict:
    """llama-batched-bench: {"repack": bool, "tok_s": {n: decode tokens/s (S_TG)}} for each
    sequence count n in ``npls``.

    Its rows go through llama.cpp's asynchronous logger, which now and then loses the last
    one at exit: a one-sequence run goes last as the one to lose, and missing counts are run
    once more."""
    tok_s: dict[int, float] = {}
    repacked = True
    for _ in range(2):
        todo = [n for n in npls if n not in tok_s]
        if not todo:
            break
        cmd = [str(root / "bin" / "llama-batched-bench"), "-m", str(path), "-t", str(threads), "-tb", str(threads),
               "-c", str(batched_ctx(todo, npp, ntg)), "-b", "2048", "-ub", "512", "-npp", str(npp),
               "-ntg", str(ntg), "-npl", ",".join(map(str, todo + [1])), "--output-format", "jsonl"]
        res, ok = _run(cmd + ([] if repacked else ["--no-repack"]), [] if not repacked else ["--no-repack"], timeout)
        repacked = repacked and ok
        for ln in res.stdout.splitlines():
            if ln.startswith("{") and ln.rstrip().endswith("}"):
                r = json.loads(ln)
                tok_s.setdefault(int(r["pl"]), float(r["speed_tg"]))
    missing = [n for n in npls if n not in tok_s]
    if missing:
        raise RuntimeError(f"llama-batched-bench gave no row for {missing} sequences")
    return {"repack": repacked, "tok_s": {n: tok_s[n] for n in npls}}


def workdir(ckpt: Path, base_dir: "str | None" = None) -> Path:
    d = Path(base_dir or tempfile.gettempdir()) / f"halserve-gguf-{ckpt.resolve().name}"
    d.mkdir(exist_ok=True)
    return d
