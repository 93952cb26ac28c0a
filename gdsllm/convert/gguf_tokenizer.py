"""Builds a `tokenizer.json` (Hugging Face `tokenizers`) from a GGUF file's `tokenizer.ggml.*` metadata.

    data = gguf_tokenizer_json(reader, path)   # bytes of a tokenizer.json
    Tokenizer.from_str(data.decode()).encode("Hello").ids

A GGUF carries no `tokenizer.json`, only the vocabulary, merges, token types and special ids.
This rebuilds the tokenizer it describes, byte-level BPE (`tokenizer.ggml.model == "gpt2"`) or
sentencepiece BPE (`"llama"`; Gemma's variant for architectures gemma/gemma2/gemma3), with exactly the settings transformers' GGUF loader uses
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`: `byte_level_tokenizer`,
`sentencepiece_tokenizer` with `LlamaTokenizer`'s pieces, `gemma_tokenizer` with `GemmaTokenizer`'s, `add_gguf_special_tokens`,
`set_split_regex`, `TokenizersBackend.update_post_processor`, and the special tokens transformers
registers), so ids agree with `AutoTokenizer(gguf_file=...)`, without importing transformers at
convert time. Where that loader and the model's own tokenizer (as llama.cpp encodes) differ, the
model's own wins: the digits-first pre-tokenizers ("smollm", "starcoder", ...; transformers
splits them as plain GPT-2), Llama 3's `ignore_merges`, and sentencepiece's space prefix on text
that starts with a space. And a default special token absent from the vocabulary (GPT-2's
"<|endoftext|>" in a Llama-3 vocabulary) is not appended, since the model has no embedding row
for it.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from gdsllm.format.metadata import FormatError

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
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's own
_DIGITS_SPLIT = r"\p{N}"  # every digit on its own (tokenizers' Digits(individual_digits=True))
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                 "lfm2", "jina-v5-nano")
# `tokenizer.ggml.pre` -> the split regexes, applied one after the other, as llama.cpp's
# llama-vocab.cpp maps these names (its regexes are hand-translated from each model's
# tokenizer.json; these are the tokenizer.json originals). transformers' GGUF loader knows the
# same names except the digits-first family (StarCoder's and SmolLM's tokenizer.json: Digits,
# then ByteLevel), which it splits as plain GPT-2. Any other value (GPT-2's "gpt-2", "default")
# keeps GPT-2's own ByteLevel regex.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(_LLAMA3_NAMES + ("dbrx", "smaug-bpe"), (_LLAMA3_SPLIT,)),
    "tekken": (_TEKKEN_SPLIT,),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), (_QWEN2_SPLIT,)),
    "qwen35": (_QWEN35_SPLIT,),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), (_GPT4O_SPLIT,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b",
                     "mellum2"),
                    (_DIGITS_SPLIT, _GPT2_SPLIT)),
}
# Vocabularies whose tokenizer.json has `ignore_merges` (a pre-token that is itself in the
# vocabulary is one token, whatever the merges would make of it), as llama.cpp sets it.
IGNORE_MERGES = frozenset(_LLAMA3_NAMES + ("tekken",))
# Names for which llama.cpp adds BOS when the GGUF does not say (tokenizer.ggml.add_bos_token).
ADD_BOS_BY_DEFAULT = frozenset(_LLAMA3_NAMES + ("tekken",))


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


def gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary, as transformers' `generate_merges` orders them:
    every split of every piece into two known pieces, best score first."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _byte_level(tokens: list[str], merges: list[str],
                ignore_merges: bool = False) -> tuple[Tokenizer, dict, set]:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet are re-spelled byte by byte, as transformers does.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, vocab, alphabet


def _sentencepiece(tokens: list[str], merges: list[str] | None, scores: list[float] | None,
                   path: Path, space_prefix: bool = True) -> tuple[Tokenizer, dict, None]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    elif scores is not None:
        pairs = generate_merges(vocab, dict(zip(tokens, scores)))
    else:
        raise FormatError(f"{path}: tokenizer.ggml.merges and tokenizer.ggml.scores are both missing")
    # The pieces of Llama's own tokenizer.json (as sentencepiece and llama.cpp encode): byte
    # fallback, "\u2581" for spaces, and one prepended to every stretch of text, the first and each
    # one after a special token, even one that starts with a space (" " is "\u2581\u2581"; the
    # Metaspace transformers' GGUF loader uses makes it "\u2581"), unless the GGUF says
    # add_space_prefix = false.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if space_prefix else [])
                                          + [normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1)] if space_prefix else []))
    return tok, vocab, None


def _gemma(tokens: list[str]) -> tuple[Tokenizer, dict, None]:
    """transformers' `gemma_tokenizer`: whitespace-only tokens respelled with "\u2581", merges
    recovered from the vocabulary ranked by file order (Gemma's scores do not follow it), and
    `GemmaTokenizer`'s pieces (spaces -> "\u2581" by a normalizer, no prefix space)."""
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, unk_token="<unk>",
                               dropout=None, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    return tok, vocab, None


GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# The defaults of the transformers class each builder uses (GPT2Tokenizer, LlamaTokenizer,
# GemmaTokenizer); transformers registers them as special tokens too.
DEFAULT_SPECIALS = {"gpt2": ("<|endoftext|>",), "llama": ("<unk>", "<s>", "</s>"),
                    "gemma": ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>")}


def gguf_tokenizer_json(reader, path: Path) -> bytes:
    """The tokenizer.json bytes for the GGUF opened as `reader` (a `gguf.GGUFReader` of `path`)."""
    kind = gguf_field(reader, "tokenizer.ggml.model")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = gguf_field(reader, "tokenizer.ggml.merges")
    if not tokens:
        raise FormatError(f"{path}: tokenizer.ggml.tokens is missing")
    types = gguf_field(reader, "tokenizer.ggml.token_type") or []
    pre = gguf_field(reader, "tokenizer.ggml.pre")
    if kind == "gpt2":
        if merges is None:
            raise FormatError(f"{path}: tokenizer.ggml.merges is missing (needed by a 'gpt2' tokenizer)")
        tok, vocab, alphabet = _byte_level(tokens, merges, ignore_merges=pre in IGNORE_MERGES)
    elif kind == "llama" and gguf_field(reader, "general.architecture") in GEMMA_ARCHITECTURES:
        tok, vocab, alphabet = _gemma(tokens)
        kind = "gemma"
    elif kind == "llama":
        tok, vocab, alphabet = _sentencepiece(tokens, merges, gguf_field(reader, "tokenizer.ggml.scores"), path,
                                              bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True)))
    else:
        raise FormatError(f"{path}: tokenizer.ggml.model is {kind!r}; GdsLLM builds 'gpt2' (byte-level "
                          f"BPE) and 'llama' (sentencepiece BPE) tokenizers")
    splits = PRE_TOKENIZER_SPLITS.get(pre) if kind == "gpt2" else None  # llama.cpp: BPE only
    if splits is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # Control tokens (<|im_start|>, ...) are special and matched whole; in a byte-level vocabulary
    # one not spelled in the byte alphabet is a llama.cpp mislabel and is skipped.
    special = [t for t, ty in zip(tokens, types)
               if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]

    def special_id(key: str) -> int | None:
        i = gguf_field(reader, f"tokenizer.ggml.{key}")
        return int(i) if i is not None and 0 <= int(i) < len(tokens) else None

    ids = {k: special_id(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    special += [tokens[i] for i in ids.values() if i is not None]
    special += [t for t in DEFAULT_SPECIALS[kind] if t in vocab]
    special = [t for t in dict.fromkeys(special) if t in vocab]  # never grow the vocabulary
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and t in vocab and t not in special]
    if user:
        tok.add_tokens(user)
    # The post-processor adds BOS/EOS as the file asks; sentencepiece vocabularies default to BOS.
    bos, eos = ids["bos"], ids["eos"]
    add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token",
                          kind != "gpt2" or pre in ADD_BOS_BY_DEFAULT)) and bos is not None
    add_eos = bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    b, e = (tokens[bos] if bos is not None else ""), (tokens[eos] if eos is not None else "")
    single = f"{b + ':0 ' if add_bos else ''}$A:0{' ' + e + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + b + ':1' if add_bos else ''} $B:1{' ' + e + ':1' if add_eos else ''}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=([(b, bos)] if add_bos else []) + ([(e, eos)] if add_eos else []))
    return tok.to_str().encode()
