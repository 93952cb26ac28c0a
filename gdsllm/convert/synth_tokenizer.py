"""A deterministic tokenizer of any vocabulary size, for synthetic models.

    data = synth_tokenizer_json(32000)          # bytes of a tokenizer.json
    Tokenizer.from_str(data.decode())           # `tokenizers`; transformers' AutoTokenizer loads
                                                # it too, with tokenizer_config() beside it

Ids 0-2 are ChatML specials as in SmolLM2 (<|endoftext|>, <|im_start|> = BOS, <|im_end|> = EOS).
With 259 ids or more it is a byte-level BPE: the 256 byte symbols, then two-symbol merges in a
fixed order (common symbols first), then filler tokens if the vocabulary is larger than all
pairs. Below 259 ids it is character level over printable ASCII (then fillers), unknown characters
-> id 0.
"""
from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from gdsllm.convert.gguf_tokenizer import bytes_to_unicode

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")


def _byte_symbols() -> list[str]:
    """The 256 byte-level symbols, most common text bytes first (so early merges are useful)."""
    spell = bytes_to_unicode()
    common = " etaoinsrhldcumfpgwybvkxjqz" + string.ascii_uppercase + string.digits + ".,'\n-:;!?()\"/"
    first = [spell[ord(c)] for c in common]
    return first + [spell[b] for b in range(256) if spell[b] not in first]


def synth_tokenizer_json(vocab_size: int) -> bytes:
    """The tokenizer.json bytes for a vocabulary of exactly `vocab_size` ids."""
    assert vocab_size > len(SPECIALS), vocab_size
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    if vocab_size < len(SPECIALS) + 256:
        for c in string.printable[: vocab_size - len(SPECIALS)]:
            vocab[c] = len(vocab)
        while len(vocab) < vocab_size:  # 100 printable characters; the rest are fillers
            vocab[f"<|filler_{len(vocab)}|>"] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIALS[UNK_ID]))
        tok.decoder = decoders.Fuse()
    else:
        symbols = _byte_symbols()
        for s in sorted(symbols, key=lambda c: ord(c)):
            vocab[s] = len(vocab)
        merges = []
        for a in symbols:  # pairs in a fixed order; all parts are single symbols already in vocab
            for b in symbols:
                if len(vocab) >= vocab_size:
                    break
                vocab[a + b] = len(vocab)
                merges.append((a, b))
        while len(vocab) < vocab_size:  # only for vocabularies beyond 256 * 256 pairs
            vocab[f"<|filler_{len(vocab)}|>"] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS])
    return tok.to_str().encode()


def tokenizer_config() -> dict:
    """`tokenizer_config.json` for the Hugging Face twin (transformers reads specials from it)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[BOS_ID],
            "eos_token": SPECIALS[EOS_ID], "unk_token": SPECIALS[UNK_ID], "pad_token": SPECIALS[EOS_ID],
            "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
            "model_max_length": 1 << 20}
