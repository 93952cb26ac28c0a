"""Synthetic models: deterministic, valid in odd shapes, and the Hugging Face twin holds the same
weights and a tokenizer that transformers loads.

    python3 -m pytest tests/test_synth.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from gdsllm.format.metadata import load_model_meta, unit_layout, unit_tensor_shapes
from gdsllm.convert.synth import SHAPES, synth, synth_params
from gdsllm.convert.synth_tokenizer import synth_tokenizer_json

ROOT = Path(__file__).resolve().parents[1]


def _checksums(root) -> list[str]:
    return [u.checksum for u in load_model_meta(root).units]


def test_same_seed_same_model_other_seed_differs(tmp_path):
    a = synth(tmp_path / "a", "tiny", seed=7)
    b = synth(tmp_path / "b", "tiny", seed=7)
    c = synth(tmp_path / "c", "tiny", seed=8)
    assert _checksums(a) == _checksums(b)
    assert all(x != y for x, y in zip(_checksums(a), _checksums(c)))
    # More layers keep the first ones: units are seeded by index, not drawn from one stream.
    d = synth(tmp_path / "d", "tiny", seed=7, layers=3)
    assert _checksums(d)[:3] == _checksums(a)[:3]


@pytest.mark.parametrize("overrides", [
    {"num_key_value_heads": 1, "vocab_size": 100},
    {"hidden_size": 96, "num_attention_heads": 3, "num_key_value_heads": 3, "intermediate_size": 200,
     "tie_word_embeddings": True, "rope_theta": 500000.0},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, "vocab_size": 70000, "hidden_size": 32,
     "num_attention_heads": 2, "num_key_value_heads": 1},
])
def test_odd_shapes_are_valid(tmp_path, overrides):
    root = synth(tmp_path / "m", "tiny", overrides=overrides, layers=1)
    meta = load_model_meta(root)
    for k, v in overrides.items():
        assert getattr(meta.params, k) == v
    assert meta.params.head_dim == meta.params.hidden_size // meta.params.num_attention_heads
    tok = Tokenizer.from_file(str(root / meta.tokenizer_file))
    assert tok.get_vocab_size() == meta.params.vocab_size
    ids = tok.encode("Hello, world! <|im_end|>").ids
    assert max(ids) < meta.params.vocab_size and ids[-1] == 2
    head = [t.name for t in meta.units[-1].tensors]  # a tied head: the norm alone
    assert head == ["norm.weight"] + ([] if meta.params.tie_word_embeddings else ["lm_head.weight"])


def test_bad_shapes_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown shape"):
        synth(tmp_path / "x", "llama-70b")
    with pytest.raises(ValueError, match="inconsistent"):
        synth(tmp_path / "x", "tiny", overrides={"num_key_value_heads": 3})
    assert list(tmp_path.iterdir()) == []


def test_hf_twin_has_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root = synth(tmp_path / "m", "tiny", dtype="bfloat16", hf_out=tmp_path / "hf", seed=5,
                 overrides={"num_key_value_heads": 1})
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.bfloat16)
    sd = hf.state_dict()
    meta = load_model_meta(root)
    for u in meta.units:
        data = torch.frombuffer(bytearray(meta.path(u).read_bytes()), dtype=torch.uint8)
        for t in u.tensors:
            ours = data[t.offset: t.offset + t.nbytes].view(torch.bfloat16).reshape(t.shape)
            name = f"model.layers.{u.layer}.{t.name}" if u.kind == "block" else \
                (t.name if t.name == "lm_head.weight" else f"model.{t.name}")
            assert torch.equal(ours, sd[name]), name
    assert hf.config.num_key_value_heads == 1 and not hf.config.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = Tokenizer.from_file(str(root / "tokenizer.json"))
    for s in ["Hello world", "ünïcödé 123", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok(s).input_ids == ours.encode(s).ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert meta.chat_template == tok.chat_template
    with torch.no_grad():  # the twin runs
        assert hf(torch.tensor([[1, 50, 60]])).logits.shape == (1, 3, meta.params.vocab_size)


def test_named_shapes_have_the_published_sizes():
    def count(p):  # a tied embedding is stored (and counted) once
        return sum(torch.Size(s).numel() for _, kind, _ in unit_layout(p) for s in unit_tensor_shapes(p, kind).values())
    assert count(SHAPES["llama-7b"]) == 6_738_415_616
    assert count(SHAPES["llama-13b"]) == 13_015_864_320
    assert count(SHAPES["smollm2-135m"]) == 134_515_008  # the real SmolLM2-135M
    assert synth_params("llama-7b", layers=2).num_hidden_layers == 2


def test_tokenizer_any_vocab_size_round_trips():
    for v in (4, 100, 258, 259, 512, 32000, 70000):
        tok = Tokenizer.from_str(synth_tokenizer_json(v).decode())
        assert tok.get_vocab_size() == v
        if v >= 259:  # byte level: every string survives
            s = "naïve 日本 🤖\n\t x<|im_start|>"
            assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s


def test_cli_synth(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gdsllm", "synth", str(tmp_path / "m"), "--shape", "smollm2-135m",
                        "--layers", "1", "--seed", "3", "--dtype", "float16"], cwd=ROOT, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    meta = load_model_meta(tmp_path / "m")
    assert meta.params.num_hidden_layers == 1 and meta.dtype == "float16" and meta.params.tie_word_embeddings
    assert meta.source == "synth:smollm2-135m:seed=3"
    r = subprocess.run([sys.executable, "-m", "gdsllm", "synth", str(tmp_path / "m")], cwd=ROOT, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and "already exists" in r.stderr
