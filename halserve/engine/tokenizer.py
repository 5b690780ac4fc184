"""Tokenizer: HF ``tokenizer.json`` through the `tokenizers` library, chat templates, and
an incremental detokenizer for streaming.

Behaviour follows Hugging Face transformers (v5 ``TokenizersBackend``) for the same
directory, without importing transformers:

- ``tokenizer.json`` is used as written (normalizer, pre-tokenizer, model, decoder,
  post-processor): its post-processor alone decides whether ``encode`` adds a bos token.
  ``add_bos_token``/``add_eos_token`` in ``tokenizer_config.json`` are ignored when a
  ``tokenizer.json`` exists, as transformers v5 does (v4 honoured them for a few classes).
- Named special tokens (bos/eos/unk/pad/...) come from ``tokenizer_config.json`` (plain
  strings or ``{"content": ...}`` objects); any that ``tokenizer.json`` lacks are added.
- The chat template comes from ``chat_template.jinja`` (plus
  ``additional_chat_templates/*.jinja``) when present, else ``tokenizer_config.json``'s
  ``chat_template`` (a string or a list of ``{"name", "template"}``).
- ``eos_token_ids`` is the tokenizer's eos token plus any ``eos_token_id`` listed in
  ``generation_config.json`` next to it (Llama-3-Instruct stops on several ids).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as _RustTokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# vLLM's starting window: enough prompt tokens before the first generated one that a
# decoder which strips a leading space (Metaspace) sees the same context both times.
_INITIAL_PREFIX_TOKENS = 5


def _token_content(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class Tokenizer:
    """A model's tokenizer: encode/decode, special tokens, and its chat template."""

    def __init__(self, backend: _RustTokenizer, config: dict | None = None,
                 chat_template: str | dict[str, str] | None = None,
                 extra_eos_token_ids: Iterable[int] = (), path: str | None = None):
        config = dict(config or {})
        self.path = path
        self._tk = backend
        # The engine owns lengths and batching; the JSON's padding/truncation must not apply.
        self._tk.no_padding()
        self._tk.no_truncation()
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name))
            if content is not None:
                self.special_tokens[name] = content
        missing = [c for c in self.special_tokens.values() if self._tk.token_to_id(c) is None]
        if missing:
            self._tk.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in dict.fromkeys(missing)])
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # HF skips the clean-up for BPE models: it would delete real spaces before punctuation.
        if type(self._tk.model).__name__ == "BPE":
            self.clean_up_tokenization_spaces = False
        if isinstance(chat_template, (list, tuple)):
            chat_template = {t["name"]: t["template"] for t in chat_template}
        self.chat_template = chat_template
        self.bos_token_id = self._id_of("bos_token")
        self.pad_token_id = self._id_of("pad_token")
        self.unk_token_id = self._id_of("unk_token")
        eos = [self._id_of("eos_token")] + [int(i) for i in extra_eos_token_ids]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in eos if i is not None))
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)
        vocab = self._tk.get_vocab(with_added_tokens=True)
        # Ids, not entries: added tokens may leave gaps, and the model's logits index by id.
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer | None":
        """Load from a model directory; None when it has no ``tokenizer.json``."""
        root = Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            return None
        config = _read_json(root / "tokenizer_config.json") or {}
        # Older checkpoints keep the named tokens in special_tokens_map.json only.
        for name, value in (_read_json(root / "special_tokens_map.json") or {}).items():
            if name in SPECIAL_TOKEN_NAMES and config.get(name) is None:
                config[name] = value
        gen = _read_json(root / "generation_config.json") or {}
        extra_eos = gen.get("eos_token_id")
        extra_eos = [] if extra_eos is None else [extra_eos] if isinstance(extra_eos, int) else list(extra_eos)
        return cls(_RustTokenizer.from_file(str(tj)), config, _load_chat_template(root, config),
                   extra_eos, path=str(root))

    def _id_of(self, name: str) -> int | None:
        content = self.special_tokens.get(name)
        return None if content is None else self._tk.token_to_id(content)

    # ---- encode / decode ----------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat ---------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template string to render with: a named one, the default, or ``chat_template`` itself."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None:
                return own.get(chat_template, chat_template)
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ValueError(f"this tokenizer has several chat templates and none is 'default'; pass "
                             f"chat_template= one of {sorted(own)}")
        if chat_template is not None:
            return chat_template
        if own is None:
            raise ValueError(f"the tokenizer in {self.path or '<memory>'} has no chat_template; pass "
                             "chat_template= or use a plain prompt")
        return own

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, tools: list | None = None,
                            documents: list | None = None, continue_final_message: bool = False,
                            **kwargs: Any) -> str:
        """Render ``messages`` to the prompt text, exactly as HF ``apply_chat_template(tokenize=False)``.

        The template already writes the bos token when the model wants one, so encode the
        result with ``add_special_tokens=False`` (or use ``encode_chat``).
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        template = self.get_chat_template(chat_template, tools)
        chat = [_message_dict(m) for m in messages]
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str):
                raise ValueError("continue_final_message needs a last message with string content")
            final = chat[-1]["content"]
            chat[-1]["content"] = final + tag
        variables = {**self.special_tokens, **kwargs}
        text = _compile_template(template).render(messages=chat, tools=tools, documents=documents,
                                                  add_generation_prompt=add_generation_prompt, **variables)
        if continue_final_message:
            at = text.rfind(tag.strip())
            if at < 0:
                raise ValueError("continue_final_message: the template dropped the final message's content")
            # The template may strip the trailing space of the tag together with the message's own.
            text = text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()
        return text

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)


# ---- chat template helpers -----------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_chat_template(root: Path, config: dict) -> str | dict[str, str] | None:
    templates: dict[str, str] = {}
    if (root / "chat_template.jinja").is_file():
        templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    extra = root / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    if not templates:
        legacy = _read_json(root / "chat_template.json") or {}
        return config.get("chat_template", legacy.get("chat_template"))
    if len(templates) == 1 and "default" in templates:
        return templates["default"]
    return templates


def _message_dict(message: Any) -> dict:
    if hasattr(message, "model_dump"):
        message = message.model_dump()
    if not isinstance(message, dict):
        raise TypeError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
    # OpenAI clients send content=None / tool_calls=None; templates handle a missing key, not None.
    return {k: v for k, v in message.items() if v is not None}


@functools.lru_cache(maxsize=32)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # HF templates may wrap assistant turns in {% generation %} for training masks;
        # for inference the block just renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; HF's (which templates are written against) does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _clean_up_spaces(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# ---- streaming ---------------------------------------------------------------------------

class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces; holds back incomplete UTF-8.

    Each step decodes only a short window: ``tokens[prefix_offset:read_offset]`` is text
    already emitted (kept as context so the decoder treats leading spaces and byte
    fallbacks the same way), ``tokens[read_offset:]`` is new. While the window's text ends
    in U+FFFD (a multi-byte character split across tokens) nothing is emitted and the
    window grows until the character completes. ``flush()`` at the end emits what is held.
    The pieces concatenate to ``decode(prompt + generated)`` minus the prompt's text
    (``decode(generated)`` when the prompt is empty); the WordPiece-only clean-up of
    ``decode`` is not applied.
    """

    __slots__ = ("tokenizer", "skip_special_tokens", "tokens", "prefix_offset", "read_offset",
                 "output_text", "_num_prompt")

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = list(prompt_ids)
        self._num_prompt = len(self.tokens)
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(self.read_offset - _INITIAL_PREFIX_TOKENS, 0)
        self.output_text = ""

    @property
    def generated_ids(self) -> list[int]:
        return self.tokens[self._num_prompt:]

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is pending)."""
        self.tokens.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character decodes to U+FFFD)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self.read_offset >= len(self.tokens):
            return ""
        decode = self.tokenizer._tk.decode  # the Rust decode itself: no Python frame between (twice a token)
        skip = self.skip_special_tokens
        window = self.tokens[self.prefix_offset:]
        prefix_text = decode(window[:self.read_offset - self.prefix_offset], skip_special_tokens=skip)
        new_text = decode(window, skip_special_tokens=skip)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        if not new_text.startswith(prefix_text):
            # The context decoded differently once more bytes arrived (a prompt that ends
            # mid-character): emit from where the two texts first differ.
            common = 0
            for a, b in zip(prefix_text, new_text):
                if a != b:
                    break
                common += 1
            delta = new_text[common:]
        else:
            delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        self.output_text += delta
        return delta


# ---- stop strings --------------------------------------------------------------------------

def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """Earliest stop string in ``text`` that ends after ``start`` (the length before the
    newest piece was appended), as ``(index, stop)``; None if there is none."""
    best: tuple[int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        at = text.find(stop, max(0, start - len(stop) + 1))
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(stop) > len(best[1]))):
            best = (at, stop)
    return best


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string:
    a streaming server holds that many characters back until it knows."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest
