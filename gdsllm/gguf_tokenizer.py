"""Builds a `tokenizer.json` (Hugging Face `tokenizers`) from a GGUF file's `tokenizer.ggml.*` metadata.

    data = gguf_tokenizer_json(reader, path)   # bytes of a tokenizer.json
    Tokenizer.from_str(data.decode()).encode("Hello").ids

A GGUF carries no `tokenizer.json`, only the vocabulary, merges, token types and special ids.
This rebuilds the byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`) with exactly the
settings transformers' GGUF loader uses (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`:
`byte_level_tokenizer`, `add_gguf_special_tokens`, `set_split_regex`, and the post-processor of
`TokenizersBackend.update_post_processor`), so ids agree with `AutoTokenizer(gguf_file=...)`,
without importing transformers at convert time.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .format import FormatError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> split regex, as transformers maps them; any other value (e.g. SmolLM2's
# "smollm", GPT-2's "default") keeps GPT-2's own ByteLevel regex.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_tokenizer_json(reader, path: Path) -> bytes:
    """The tokenizer.json bytes for the GGUF opened as `reader` (a `gguf.GGUFReader` of `path`)."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise FormatError(f"{path}: tokenizer.ggml.model is {kind!r}; GdsLLM builds tokenizers for "
                          f"byte-level BPE ('gpt2') GGUFs only")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise FormatError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = _field(reader, "tokenizer.ggml.token_type") or []
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet are re-spelled byte by byte, as transformers does.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(_field(reader, "tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are special and matched whole; one that is not spelled in
    # the byte alphabet is a llama.cpp mislabel and is skipped (adding it would grow the vocabulary).
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)

    def special(key: str) -> tuple[str, int] | None:
        i = _field(reader, f"tokenizer.ggml.{key}")
        return None if i is None or not 0 <= int(i) < len(tokens) else (tokens[int(i)], int(i))

    bos, eos = special("bos_token_id"), special("eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = f"{bos[0] + ':0 ' if add_bos else ''}$A:0{' ' + eos[0] + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos[0] + ':1' if add_bos else ''} $B:1{' ' + eos[0] + ':1' if add_eos else ''}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=([bos] if add_bos else []) + ([eos] if add_eos else []))
    return tok.to_str().encode()
