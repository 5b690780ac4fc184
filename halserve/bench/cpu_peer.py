"""llama.cpp as the CPU peer of ``halserve bench cpu``: convert a safetensors checkpoint to
GGUF with llama.cpp's own converter, quantize, and run llama-bench / llama-batched-bench.

``root`` is an extracted llama.cpp archive (``bin/``) plus its converter (``converter/``),
as in ../shared/peers/llama.cpp/README.md. Random benchmark checkpoints carry no
tokenizer, so a tiny BPE one is written beside a linked copy of the checkpoint; the
converter is run with two run-time shims (a sentencepiece stub it imports before looking
for tokenizer.model, and 'gpt-2' as the pre-tokenizer name of that tiny tokenizer)."""
from __future__ import annotations

import json
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
GGUF_TYPES = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}
QUANT_TYPES = {"int8": "q8_0", "int8_w8a8": "q8_0", "int4": "q4_0"}


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
    cmd = [sys.executable, str(stub / "run_convert.py"), str(root / "converter" / "convert_hf_to_gguf.py"),
           str(src), "--outtype", outtype, "--outfile", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed: {res.stderr.strip().splitlines()[-1:]}")
    return out


def quantize(root: Path, f16: Path, qtype: str, threads: int) -> Path:
    out = f16.with_name(f"model-{qtype}.gguf")
    if not out.is_file():
        subprocess.run([str(root / "bin" / "llama-quantize"), str(f16), str(out), qtype, str(threads)],
                       check=True, capture_output=True, timeout=900)
    return out


def tg_tokens_per_s(root: Path, gguf: Path, threads: int, n: int, extra=()) -> float:
    """llama-bench batch-1 generation (tg) tokens/s."""
    res = subprocess.run([str(root / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
                          "-n", str(n), "-r", "2", "-o", "json", *extra], capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({res.returncode}): {res.stderr.strip()[-200:]}")
    return float(json.loads(res.stdout)[0]["avg_ts"])


def batched_decode_tokens_per_s(root: Path, gguf: Path, threads: int, npl: int, npp: int, ntg: int) -> float:
    """llama-batched-bench: decode tokens/s of ``npl`` sequences (S_TG)."""
    ctx = npl * (npp + ntg) + 64
    res = subprocess.run([str(root / "bin" / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads),
                          "-tb", str(threads), "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(npp),
                          "-ntg", str(ntg), "-npl", str(npl), "--output-format", "jsonl"],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({res.returncode}): {res.stderr.strip()[-200:]}")
    rows = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    return float(rows[-1]["speed_tg"])


def workdir(ckpt: Path) -> Path:
    d = Path(tempfile.gettempdir()) / f"halserve-gguf-{ckpt.resolve().name}"
    d.mkdir(exist_ok=True)
    return d
