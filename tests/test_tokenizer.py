"""The Tokenizer against transformers: encode ids, chat templates, streaming detokenization."""
from __future__ import annotations

import json
from dataclasses import replace

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
