"""Tokenizer vs HF transformers on tokenizers built here (no downloads), chat templates,
the incremental detokenizer and the stop-string helpers."""
from __future__ import annotations

import json
import time

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer

from halserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop, partial_stop_len

CORPUS = [
    "def join(a, *p):\n    \"\"\"Join two or more pathname components.\"\"\"\n    return a\n",
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "Hello, world! Numbers: 12345 67890, 3.14159; symbols #@$%^&*()[]{}<>",
    "日本語のテキスト、中文文本，한국어 텍스트. Ünïcödé àccents — dashes “quotes”.",
    "Emoji: 😀🎉👍🏽 🇫🇷 and 👨‍👩‍👧 families.",
    "    indented\tcode\n\n\nwith   many    spaces   ",
]
TEXTS = CORPUS + [
    "",
    " ",
    "a",
    "  leading and trailing  ",
    "new\r\nlines\r\n",
    "<|user|>inline special<|eos|> tokens<|assistant|>",
    "partial <|use special",
    "🧑‍💻 writes 漢字 and ẞ",
    "x" * 300,
]
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]

SIMPLE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}{{ eos_token }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}{{ eos_token }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Close in spirit to Llama 3's: bos in the template, header tokens, a date from strftime_now.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CONVERSATIONS = [
    [{"role": "user", "content": "What does `os.path.join` do?"}],
    [{"role": "system", "content": "  Be brief.  "},
     {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello! 你好"},
     {"role": "user", "content": "and then?", "name": None}],
]


def _train_byte_bpe(vocab_size: int, specials: list[str]) -> RustTokenizer:
    tk = RustTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 20, trainer=trainer)
    return tk


def _write(path, tk: RustTokenizer, config: dict, extra: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (extra or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def byte_bpe_dir(tmp_path_factory):
    tk = _train_byte_bpe(400, SPECIALS)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
           "eos_token": {"content": "<|eos|>", "special": True, "__type": "AddedToken"},
           "pad_token": "<|pad|>", "chat_template": SIMPLE_TEMPLATE, "clean_up_tokenization_spaces": False}
    return _write(tmp_path_factory.mktemp("byte_bpe"), tk, cfg)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = RustTokenizer(models.BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 20, trainer=trainer)
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": True}
    d = _write(tmp_path_factory.mktemp("llama3"), tk, cfg)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [tk.token_to_id("<|end_of_text|>"),
                                                                          tk.token_to_id("<|eot_id|>")]}))
    return d


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """Llama-2/Mistral style: Metaspace pre-tokenizer, BPE with byte fallback, bos by post-processor."""
    tk = RustTokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tk.train_from_iterator([t for t in CORPUS if t.isascii()] * 20, trainer=trainer)
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # the <0xNN> pieces byte fallback decodes through
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    tk = RustTokenizer.from_str(json.dumps(spec))
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "chat_template": SIMPLE_TEMPLATE}
    return _write(tmp_path_factory.mktemp("spm"), tk, cfg)


def _hf(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


# ---- encode / decode against HF -------------------------------------------------------------

@pytest.mark.parametrize("which", ["byte_bpe_dir", "llama3_dir", "spm_dir"])
def test_encode_decode_match_hf(which, request):
    path = request.getfixturevalue(which)
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert ours.vocab_size == len(hf)
    assert ours.encode_batch(TEXTS) == [hf.encode(t) for t in TEXTS]


def test_llama3_bos_and_eos(llama3_dir):
    tok, hf = Tokenizer.from_dir(llama3_dir), _hf(llama3_dir)
    assert tok.encode("hi")[0] == tok.bos_token_id == hf.bos_token_id
    assert tok.encode("hi", add_special_tokens=False)[0] != tok.bos_token_id
    assert tok.eos_token_ids == [tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")]


def test_add_bos_flag_ignored_with_tokenizer_json(tmp_path):
    # transformers v5: tokenizer.json's post-processor decides; the config flags do not.
    tk = _train_byte_bpe(300, SPECIALS)  # no post-processor in tokenizer.json
    for flags in ({}, {"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True},
                  {"add_bos_token": False}):
        d = _write(tmp_path / str(len(list(tmp_path.iterdir()))), tk,
                   {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
                    **flags})
        ours, hf = Tokenizer.from_dir(d), _hf(d)
        for text in ("hello there", ""):
            assert ours.encode(text) == hf.encode(text), flags
        assert ours.encode("x")[0] != ours.bos_token_id


def test_missing_named_special_token_is_added(tmp_path):
    tk = _train_byte_bpe(300, [])
    d = _write(tmp_path, tk, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"})
    ours, hf = Tokenizer.from_dir(d), _hf(d)
    assert ours.eos_token_ids == [hf.eos_token_id]
    assert ours.encode("a</s>b") == hf.encode("a</s>b")
    assert ours.decode(ours.encode("a</s>b")) == "ab"


def test_from_dir_without_tokenizer_json(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


# ---- chat templates -------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["byte_bpe_dir", "llama3_dir"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(which, add_generation_prompt, request):
    path = request.getfixturevalue(which)
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    for conv in CONVERSATIONS:
        kw = {"date_string": "26 Jul 2024"} if which == "llama3_dir" else {}
        want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)
        got = ours.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, **kw)
        assert got == want
        assert ours.encode_chat(conv, add_generation_prompt, **kw) == hf.apply_chat_template(
            conv, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False, **kw)


def test_chat_template_tools_and_continue(byte_bpe_dir):
    ours, hf = Tokenizer.from_dir(byte_bpe_dir), _hf(byte_bpe_dir)
    tools = [{"type": "function", "function": {"name": "f", "description": "é <b>", "parameters": {}}}]
    conv = CONVERSATIONS[0]
    assert ours.apply_chat_template(conv, tools=tools) == hf.apply_chat_template(
        conv, tools=tools, tokenize=False, add_generation_prompt=True)
    conv = CONVERSATIONS[0] + [{"role": "assistant", "content": "It joins"}]
    want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert ours.apply_chat_template(conv, add_generation_prompt=False, continue_final_message=True) == want
    assert want.endswith("<|assistant|>It joins")


def test_chat_template_strftime_now(llama3_dir):
    import re
    text = Tokenizer.from_dir(llama3_dir).apply_chat_template(CONVERSATIONS[0])
    assert re.search(r"Today Date: \d\d \w{3} \d{4}\n", text), text


def test_raise_exception_and_sandbox(byte_bpe_dir):
    import jinja2
    tok = Tokenizer.from_dir(byte_bpe_dir)
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([], chat_template="{{ [].append(1) }}")  # immutable sandbox
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([], chat_template="{{ ''.__class__.__mro__[1] }}")


def test_chat_template_file_and_named_templates(tmp_path, byte_bpe_dir):
    tk = RustTokenizer.from_file(str(byte_bpe_dir / "tokenizer.json"))
    base = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>"}
    d1 = _write(tmp_path / "jinja", tk, {**base, "chat_template": "ignored"},
                {"chat_template.jinja": "FILE{% for m in messages %}[{{ m.content }}]{% endfor %}"})
    d2 = _write(tmp_path / "named", tk, {**base, "chat_template": [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ messages[0].content }}{{ tools | length }}"}]})
    conv = [{"role": "user", "content": "q"}]
    for d in (d1, d2):
        ours, hf = Tokenizer.from_dir(d), _hf(d)
        assert ours.apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False,
                                                                         add_generation_prompt=True)
    ours = Tokenizer.from_dir(d2)
    assert ours.apply_chat_template(conv) == "Dq"
    assert ours.apply_chat_template(conv, tools=[{}]) == "Tq1"
    assert ours.apply_chat_template(conv, chat_template="tool_use", tools=[]) == "Tq0"
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_dir(_write(tmp_path / "none", tk, base)).apply_chat_template(conv)


# ---- incremental detokenizer ----------------------------------------------------------------

STREAM_TEXTS = ["Emoji: 😀🎉👍🏽 🇫🇷 and 👨‍👩‍👧 families.", "日本語のテキスト、中文文本，한국어",
                "mixed 🧑‍💻 ascii and 漢字 ẞ<|eos|> after special", "plain ascii text only"]


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_matches_full_decode(byte_bpe_dir, skip):
    tok = Tokenizer.from_dir(byte_bpe_dir)
    for text in STREAM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        pieces = [detok.add(i) for i in ids]
        assert "".join(pieces) + detok.flush() == tok.decode(ids, skip_special_tokens=skip)
        assert detok.output_text == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
        if any(ord(c) > 0x7FF for c in text):
            assert "" in pieces  # at least one token only carried part of a character


def test_incremental_spm_spaces_and_byte_fallback(spm_dir):
    tok = Tokenizer.from_dir(spm_dir)
    for text in STREAM_TEXTS + [" two  spaces and a leading one", "Hello world"]:
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.add(i) for i in ids]
        assert "".join(pieces) + detok.flush() == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
    ids = tok.encode("日本", add_special_tokens=False)
    assert all(tok.id_to_token(i).startswith("<0x") for i in ids[1:])  # byte fallback, 6 pieces


def test_incremental_with_prompt(byte_bpe_dir, llama3_dir, spm_dir):
    for d in (byte_bpe_dir, llama3_dir, spm_dir):
        tok = Tokenizer.from_dir(d)
        prompt = tok.encode("User said: 你好 👋 and")
        gen = tok.encode(" then 😀 ok 中文.", add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, prompt)
        out = "".join(detok.add(i) for i in gen) + detok.flush()
        full = tok.decode(prompt + gen)
        assert full == tok.decode(prompt) + out
        assert detok.generated_ids == gen


def test_incremental_holds_incomplete_then_flushes(byte_bpe_dir):
    tok = Tokenizer.from_dir(byte_bpe_dir)
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1, "the test vocab must split the emoji into byte tokens"
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.flush() == tok.decode(ids[:-1]) and "\ufffd" in detok.output_text


def test_incremental_window_stays_small(byte_bpe_dir):
    tok = Tokenizer.from_dir(byte_bpe_dir)
    ids = tok.encode(" ".join(STREAM_TEXTS) * 40, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, ids[:100])
    widest, t0 = 0, time.perf_counter()
    for i in ids:
        detok.add(i)
        widest = max(widest, len(detok.tokens) - detok.prefix_offset)
    elapsed = time.perf_counter() - t0
    assert widest <= 16  # a window of recent tokens, never the whole sequence
    assert elapsed / len(ids) < 1e-3, f"{elapsed / len(ids) * 1e6:.0f} us per token"


# ---- stop strings -----------------------------------------------------------------------------

def test_find_stop():
    assert find_stop("hello world", ["wor", "lo"]) == (3, "lo")
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("abcSTOPdef", ["STOP"], start=5) == (3, "STOP")  # straddles the new piece
    assert find_stop("STOP...STOP", ["STOP"], start=9) == (7, "STOP")
    assert find_stop("ab", ["", "b"]) == (1, "b")
    assert find_stop("xabc", ["ab", "abc"]) == (1, "abc")


def test_partial_stop_len():
    assert partial_stop_len("the end <|e", ["<|eos|>"]) == 3
    assert partial_stop_len("the end", ["<|eos|>"]) == 0
    assert partial_stop_len("a\n\n", ["\n\n\n", "x"]) == 2
    assert partial_stop_len("", ["abc"]) == 0


# ---- the shipped demo model's tokenizer ------------------------------------------------------

def test_demo_model_tokenizer():
    from pathlib import Path

    import halserve
    path = Path(halserve.__file__).resolve().parent / "demo_model"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("halserve/demo_model is not built (tools/make_demo_model.py)")
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    assert ours.vocab_size == len(hf) == 4096
    assert ours.eos_token_ids == [hf.eos_token_id] and ours.bos_token_id == hf.bos_token_id
    code = 'def join(a, *p):\n    """Join two or more pathname components."""\n'
    assert ours.encode(code)[0] == ours.bos_token_id and ours.encode(code) == hf.encode(code)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does `os.path.join` do?"}]
    assert ours.apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(conv).endswith("<|user|>\nWhat does `os.path.join` do?<|eos|>\n<|assistant|>\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]
    assert ours.apply_chat_template(parts) == "<|bos|><|user|>\nhi<|eos|>\n<|assistant|>\n"
