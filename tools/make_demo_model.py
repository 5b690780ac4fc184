#!/usr/bin/env python
"""Build the demo model that ships in ``halserve/demo_model/``: a tiny LlamaForCausalLM
trained on CPU on the Python standard library's own source, with a byte-level BPE
tokenizer and a chat template.

    python tools/make_demo_model.py                 # writes halserve/demo_model/
    python tools/make_demo_model.py --out /tmp/demo --steps 20   # quick smoke run

Everything comes from this machine: the text is the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (test suites excluded), read in sorted order, and the
chat data are question/answer pairs made from their docstrings ("What does
`os.path.join` do?" -> its signature and the first paragraph of its docstring). With the
same Python version, torch version and ``--threads``, the run is reproducible bit for bit:
seeds are fixed and file order is sorted.

Run time: about 20 minutes on one thread of a busy shared AMD EPYC (18.8 min of it
training at 2.5 s/step; about 13 min at 1.7 s/step on a quiet core). docs/demo_model.md
has the last run's numbers, loss curve and samples. Needs torch, tokenizers, transformers, safetensors, tqdm.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "halserve" / "demo_model"
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
             "__pycache__", "lib2to3", "ensurepip"}
MAX_FILE_BYTES = 200_000  # pydoc_data/topics.py and a few generated tables would dominate
# Codec maps (encodings/cp437.py ...), html.entities, stringprep: a first run spent its
# capacity on these low-entropy tables and answered "def " with one. A file with this share
# of lines holding hex/escape literals is data, not code.
TABLE_LINE = re.compile(r"0x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\x[0-9a-fA-F]{2}")
MAX_TABLE_SHARE = 0.3
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
SYSTEM_PROMPT = "You are a helpful assistant who knows the Python standard library."
QUESTIONS = ["What does `{}` do?", "What is `{}` for?", "Explain `{}`.", "Tell me about `{}`."]
MODULE_QUESTIONS = ["What is the `{}` module?", "What does the `{}` module do?"]

# bos, then one block per message, each closed by eos; the model stops on eos after its turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=1, help="torch and tokenizers threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--batch", type=int, default=12, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--chat-fraction", type=float, default=0.25, help="share of each batch from chat data")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-mb", type=float, default=20.0, help="fail if the checkpoint is larger")
    return p.parse_args(argv)


# ---- data ---------------------------------------------------------------------------------

def stdlib_files() -> list[tuple[str, Path]]:
    """(module name, path) of every stdlib .py file we train on, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & SKIP_DIRS or path.stat().st_size > MAX_FILE_BYTES:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def read_source(path: Path) -> str | None:
    """The file's text; None if it cannot be decoded or is mostly a data table."""
    try:
        with tokenize.open(path) as f:  # honours PEP 263 coding cookies
            text = f.read()
    except (SyntaxError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    if lines and sum(1 for line in lines if TABLE_LINE.search(line)) > MAX_TABLE_SHARE * len(lines):
        return None
    return text


def first_paragraph(doc: str, limit: int = 300) -> str | None:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if len(para) < 12 or not para[0].isalpha():
        return None
    if len(para) > limit:  # cut at the last sentence end that fits, else at a word
        cut = para.rfind(". ", 0, limit)
        para = para[:cut + 1] if cut > 40 else para[:para.rfind(" ", 0, limit)] + " ..."
    return para


def docstring_pairs(module: str, source: str) -> list[tuple[str, str, str]]:
    """(kind, qualified name, answer) for the public documented things in one module."""
    if any(part.startswith("_") for part in module.split(".")):
        return []
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    pairs = []
    if (doc := ast.get_docstring(tree)) and (para := first_paragraph(doc)):
        pairs.append(("module", module, para))

    def visit(body, prefix):
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            para = first_paragraph(doc) if doc else None
            if para:
                if isinstance(node, ast.ClassDef):
                    answer = f"`class {node.name}`: {para}"
                else:
                    args = ast.unparse(node.args)
                    if prefix.count(".") > module.count("."):  # a method: drop self/cls
                        args = re.sub(r"^(self|cls)(, )?", "", args)
                    answer = f"`{node.name}({args})`: {para}"
                pairs.append(("object", name, answer))
            if isinstance(node, ast.ClassDef):
                visit(node.body, name)

    visit(tree.body, module)
    return pairs


def chat_examples(pairs, rng) -> list[list[dict]]:
    convs = []
    for kind, name, answer in pairs:
        questions = MODULE_QUESTIONS if kind == "module" else QUESTIONS
        msgs = [{"role": "user", "content": questions[int(rng.integers(len(questions)))].format(name)},
                {"role": "assistant", "content": answer}]
        if rng.random() < 0.25:
            msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        convs.append(msgs)
    return convs


# ---- tokenizer ------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    bos = tk.token_to_id("<|bos|>")
    # encode(text) starts with bos, as the model saw every training document start.
    tk.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B:1", special_tokens=[("<|bos|>", bos)])
    return tk


def write_tokenizer(tk, out: Path, max_len: int) -> None:
    tk.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- model ----------------------------------------------------------------------------------

def build_model(vocab_size: int, ids: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.02,
        hidden_act="silu", attention_bias=False, mlp_bias=False, **ids)
    return LlamaForCausalLM(config)


def lr_at(step: int, total: int, peak: float, warmup: int = 30, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def sample_windows(stream, n: int, seq_len: int, rng):
    import numpy as np
    import torch

    starts = rng.integers(0, len(stream) - seq_len, size=n)
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads == 1:  # before tokenizers is imported: its thread pool reads this once
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import numpy as np
    import torch
    from tqdm import tqdm

    sys.path.insert(0, str(REPO))
    from halserve.engine.tokenizer import Tokenizer

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        (out / name).unlink(missing_ok=True)

    # 1. text: stdlib sources; every 50th file is held out for evaluation
    files = stdlib_files()
    sources, pairs = [], []
    for module, path in tqdm(files, desc="read stdlib", unit="file"):
        text = read_source(path)
        if text is None:
            continue
        sources.append((module, text))
        pairs.extend(docstring_pairs(module, text))
    train_src = [t for i, (_, t) in enumerate(sources) if i % 50 != 0]
    eval_src = [t for i, (_, t) in enumerate(sources) if i % 50 == 0]
    convs = chat_examples(pairs, rng)
    print(f"python {sys.version.split()[0]}, stdlib {sysconfig.get_paths()['stdlib']}: {len(sources)} files "
          f"({sum(len(t) for t in train_src) / 1e6:.1f} M chars train, {len(eval_src)} held out), "
          f"{len(convs)} chat examples")

    # 2. tokenizer
    t0 = time.perf_counter()
    tk = train_tokenizer([t for _, t in sources] + [c[-1]["content"] for c in convs], args.vocab_size)
    write_tokenizer(tk, out, 2048)
    tok = Tokenizer.from_dir(out)
    print(f"tokenizer: vocab {tok.vocab_size}, trained in {time.perf_counter() - t0:.0f} s")

    eos = tok.eos_token_ids[0]
    def stream(docs: list[list[int]]):
        return np.fromiter((t for d in docs for t in d), dtype=np.int32)

    code = stream([ids + [eos] for ids in tok.encode_batch(train_src)])
    held = stream([ids + [eos] for ids in tok.encode_batch(eval_src)])
    chat = stream([tok.encode_chat(c, add_generation_prompt=False) for c in tqdm(convs, desc="chat", unit="ex")])
    print(f"tokens: code {len(code) / 1e6:.2f} M, chat {len(chat) / 1e6:.2f} M, held-out {len(held) / 1e3:.0f} k "
          f"({sum(len(t) for t in train_src) / len(code):.2f} chars/token)")

    # 3. model and training
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    model = build_model(tok.vocab_size, ids)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {n_params / 1e6:.2f} M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    eval_rng = np.random.default_rng(args.seed + 1)
    eval_code = sample_windows(held, 16, args.seq_len, eval_rng)
    eval_chat = sample_windows(chat, 8, args.seq_len, eval_rng)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        losses = tuple(model(input_ids=x, labels=x).loss.item() for x in (eval_code, eval_chat))
        model.train()
        return losses

    n_chat = round(args.batch * args.chat_fraction)
    curve = []
    model.train()
    t_train = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        x = torch.cat([sample_windows(code, args.batch - n_chat, args.seq_len, rng),
                       sample_windows(chat, n_chat, args.seq_len, rng)])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step == 0 or step + 1 == args.steps:
            ev_code, ev_chat = evaluate()
            curve.append((step + 1, loss.item(), ev_code, ev_chat))
            tqdm.write(f"step {step + 1:5d}  train {loss.item():.3f}  held-out code {ev_code:.3f}  "
                       f"chat {ev_chat:.3f}  ({time.perf_counter() - t_train:.0f} s)")
    train_s = time.perf_counter() - t_train

    # 4. save in bfloat16, check size, reload and sample
    model.config.dtype = torch.bfloat16
    model.to(torch.bfloat16).save_pretrained(out)
    model.generation_config.save_pretrained(out)
    files_out = sorted(p for p in out.iterdir() if p.is_file())
    total_mb = sum(p.stat().st_size for p in files_out) / 1e6
    for p in files_out:
        print(f"  {p.name:28s} {p.stat().st_size / 1e6:8.2f} MB")
    print(f"total {total_mb:.2f} MB")
    if total_mb > args.max_mb:
        print(f"error: the demo model is {total_mb:.1f} MB, over --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    final = evaluate_bf16(out, eval_code, eval_chat)
    print("loss curve (step, train, held-out code, held-out chat):")
    for row in curve:
        print("  %5d  %.3f  %.3f  %.3f" % row)
    print(f"final held-out loss in bf16: code {final[0]:.3f}, chat {final[1]:.3f}")
    samples(out, tok)
    print(f"training {train_s / 60:.1f} min ({train_s / args.steps:.2f} s/step, "
          f"{args.steps * args.batch * args.seq_len / train_s:.0f} tokens/s), "
          f"whole run {(time.perf_counter() - t_start) / 60:.1f} min, threads {args.threads}, torch {torch.__version__}")
    return 0


def evaluate_bf16(out: Path, *batches) -> list[float]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return [model(input_ids=x, labels=x).loss.float().item() for x in batches]


def samples(out: Path, tok) -> None:
    """Print a few generations from the saved checkpoint (greedy and seeded sampling)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompts = [("completion", "def "), ("completion", "import os\n\n\ndef "),
               ("completion", 'class Path:\n    """'),
               ("chat", "What does `os.path.join` do?"), ("chat", "What is the `json` module?")]
    for kind, text in prompts:
        if kind == "chat":
            ids = tok.encode_chat([{"role": "user", "content": text}])
        else:
            ids = tok.encode(text)
        x = torch.tensor([ids])
        for mode in ("greedy", "sampled"):
            torch.manual_seed(0)
            kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.7, top_p=0.9)
            with torch.no_grad():
                y = model.generate(x, max_new_tokens=64, eos_token_id=tok.eos_token_ids,
                                   pad_token_id=tok.pad_token_id, **kw)
            gen = tok.decode(y[0, len(ids):].tolist())
            print(f"--- {kind} {mode}: {text!r}\n{gen}")


if __name__ == "__main__":
    sys.exit(main())
