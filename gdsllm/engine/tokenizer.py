"""The model's tokenizer: `tokenizer.json` through Hugging Face `tokenizers`, chat templates
rendered with jinja2 exactly as transformers renders them, and streaming detokenization.

    tok = Tokenizer(load_model_meta(model_dir))
    ids = tok.encode("Once upon a time")          # special tokens as the tokenizer.json says
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(text, add_special_tokens=False)   # a rendered template has its own
    detok = tok.detokenizer(prompt_ids)
    for t in new_ids: print(detok.push(t), end="")   # text deltas; never half a character
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from gdsllm.format.metadata import FormatError, ModelMeta

# Tokens of prompt context the detokenizer decodes along with new tokens, so that decoders which
# depend on neighbours (SentencePiece's leading space) render a token as they would mid-text.
CONTEXT_TOKENS = 5


class Tokenizer:
    def __init__(self, meta: ModelMeta):
        if not meta.tokenizer_file:
            raise FormatError(f"{meta.root}: the model has no tokenizer (metadata tokenizer_file is "
                              f"empty); pass token ids instead of text")
        path = meta.root / meta.tokenizer_file
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise FormatError(f"{path}: cannot load tokenizer: {e}") from None
        self.path = path
        self.chat_template = meta.chat_template
        self.eos_token_ids = tuple(meta.params.eos_token_ids)
        bos = meta.params.bos_token_id
        self.bos_token = self.tok.id_to_token(bos) if bos is not None else None
        self.eos_token = self.tok.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens are added only as the tokenizer.json's post-processor
        says (as transformers' `tokenizer(text)` does). Through `encode_batch`, the same ids, because
        it releases the GIL: a service tokenizing in a worker thread keeps its event loop running."""
        return self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @functools.cached_property
    def max_token_chars(self) -> int | None:
        """A bound on the characters of text one token stands for: a text of n characters has at
        least n / max_token_chars tokens, so a prompt too long for any context is refused before
        it is tokenized. The longest vocabulary entry (a byte-level BPE entry is one character
        per byte, a SentencePiece one a character per character), times 4 for normalizers that
        compose characters (NFC, NFKC); None where the tokenizer may drop text outright (strip,
        split on whitespace, a precompiled SentencePiece map, a shrinking replacement)."""
        def drops(node) -> bool:
            if isinstance(node, list):
                return any(drops(n) for n in node)
            if not isinstance(node, dict):
                return False
            kind = node.get("type")
            if kind in ("Strip", "Whitespace", "WhitespaceSplit", "BertPreTokenizer", "BertNormalizer",
                        "Precompiled"):
                return True
            if kind == "Split" and node.get("behavior") == "Removed":
                return True
            if kind == "Replace":
                pattern = node.get("pattern") or {}
                if "String" not in pattern or len(str(node.get("content", ""))) < len(pattern["String"]):
                    return True
            return any(drops(v) for v in node.values())
        cfg = json.loads(self.tok.to_str())
        if drops(cfg.get("normalizer")) or drops(cfg.get("pre_tokenizer")):
            return None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        return 4 * max((len(t) for t in vocab), default=1)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_ids: list[int] = ()) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat prompt: the template rendered with the generation prompt, encoded
        without adding special tokens (the template writes them), as transformers does."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True),
                           add_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if not self.chat_template:
            raise ValueError(f"{self.path.parent}: the model has no chat template; use a raw prompt")
        if not isinstance(messages, list) or not messages:
            raise ValueError("chat messages must be a non-empty list of {'role', 'content'} dicts")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"chat message {m!r}: expected a dict with 'role' and 'content'")
        if self._template is None:
            self._template = _compile(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None


def _compile(source: str) -> jinja2.Template:
    """The environment transformers' `_compile_jinja_template` builds (sandboxed, trim/lstrip)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja's tojson, which would HTML-escape
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise FormatError(f"chat template: syntax error line {e.lineno}: {e.message}") from None


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas (vLLM's prefix/read offsets scheme).

    A token that ends inside a multi-byte UTF-8 character decodes to U+FFFD; its text is held
    back until the following tokens complete the character.
    """

    def __init__(self, tok: Tokenizer, prompt_ids=()):
        self.tok = tok
        self.ids = list(prompt_ids)[-CONTEXT_TOKENS:]
        self.prefix = 0  # ids[prefix:read] is context already turned into text
        self.read = len(self.ids)
        self.text = ""  # all text emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (may be "")."""
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing visible yet, or an unfinished character
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the stream: whatever is held back, incomplete characters included."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        delta = after[len(before):] if len(after) > len(before) else ""
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta
