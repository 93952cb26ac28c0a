"""The Hugging Face converter: safetensors directories (synthetic and saved by transformers) read
back exactly, rope settings old and new, and bad input (one clear error naming file and field,
nothing half-written).

    python3 -m pytest tests/test_convert.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_helpers import no_leftovers, read_model
from gdsllm.convert.hf import convert_hf
from gdsllm.convert.synth import synth, synth_params
from gdsllm.format.metadata import FormatError, load_model_meta


# --- Hugging Face directories -----------------------------------------------------------------

@pytest.mark.parametrize("dtype,tied", [("float32", False), ("bfloat16", True), ("float16", False)])
def test_hf_roundtrip_exact(tmp_path, dtype, tied):
    hf = tmp_path / "hf"
    synth(tmp_path / "s", "tiny", dtype=dtype, hf_out=hf, seed=3, overrides={"tie_word_embeddings": tied})
    out = convert_hf(hf, tmp_path / "out", dtype=dtype)
    ours = read_model(out)
    src = {}
    for shard in sorted(hf.glob("*.safetensors")):
        src.update(load_file(shard))
    if tied:
        assert "lm_head.weight" not in src
        src["lm_head.weight"] = src["model.embed_tokens.weight"]
    assert set(ours) == set(src)
    for k, v in src.items():
        assert v.dtype == ours[k].dtype and torch.equal(ours[k], v), k
    assert load_model_meta(out).params == synth_params("tiny", overrides={"tie_word_embeddings": tied})
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


def test_hf_from_transformers_rope_scaling_and_single_file(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from tokenizers import Tokenizer
    from gdsllm.convert.synth_tokenizer import synth_tokenizer_json
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2, rope_theta=500000.0,
                      rope_scaling=dict(scaling), eos_token_id=[2, 0], tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "hf")
    Tokenizer.from_str(synth_tokenizer_json(300).decode()).save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "chat_template.jinja").write_text("{{ 'jinja' }}")
    out = convert_hf(tmp_path / "hf", tmp_path / "out")
    meta = load_model_meta(out)
    assert meta.params.rope_theta == 500000.0 and meta.params.rope_scaling == scaling
    assert meta.params.head_dim == 8 and meta.params.eos_token_ids == (2, 0)
    assert meta.chat_template == "{{ 'jinja' }}"
    ours = read_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(ours[k], v), k


def test_hf_legacy_rope_keys(tmp_path):
    synth(tmp_path / "s", "tiny", hf_out=tmp_path / "hf", dtype="float32")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=1234.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    p = load_model_meta(convert_hf(tmp_path / "hf", tmp_path / "out")).params
    assert p.rope_theta == 1234.0 and p.rope_scaling == {"rope_type": "linear", "factor": 2.0}


# --- bad input: one clear error naming file and field, nothing half-written ---------------------

def _hf(tmp_path) -> Path:
    synth(tmp_path / "s", "tiny", hf_out=tmp_path / "hf", dtype="float32")
    return tmp_path / "hf"


def _edit_shard(hf: Path, fn) -> Path:
    shard = sorted(hf.glob("*.safetensors"))[1]  # block 0
    tensors = fn(load_file(shard))
    save_file(tensors, str(shard))
    return shard


@pytest.mark.parametrize("case", ["no_config", "arch", "no_tokenizer", "int8", "missing_tensor",
                                  "missing_shard", "bad_json"])
def test_hf_bad_input(tmp_path, case):
    hf = _hf(tmp_path)
    expect = {"no_config": "config.json", "arch": "GPT2LMHeadModel", "no_tokenizer": "tokenizer.json",
              "bad_json": "config.json"}.get(case)
    if case == "no_config":
        (hf / "config.json").unlink()
    elif case == "bad_json":
        (hf / "config.json").write_text("{not json")
    elif case == "arch":
        cfg = json.loads((hf / "config.json").read_text())
        cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
        (hf / "config.json").write_text(json.dumps(cfg))
    elif case == "no_tokenizer":
        (hf / "tokenizer.json").unlink()
    elif case == "int8":
        shard = _edit_shard(hf, lambda t: {**t, "model.layers.0.mlp.up_proj.weight":
                                           t["model.layers.0.mlp.up_proj.weight"].to(torch.int8)})
        expect = f"{shard.name}: tensor 'model.layers.0.mlp.up_proj.weight' has unsupported dtype"
    elif case == "missing_tensor":
        _edit_shard(hf, lambda t: {k: v for k, v in t.items() if "k_proj" not in k})
        expect = "model.layers.0.self_attn.k_proj.weight"
    elif case == "missing_shard":
        shard = sorted(hf.glob("*.safetensors"))[2]
        shard.unlink()
        expect = f"{shard.name}: not found"
    with pytest.raises(FormatError, match=None) as e:
        convert_hf(hf, tmp_path / "out")
    assert expect in str(e.value) and (str(hf) in str(e.value) or "config.json" in str(e.value))
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []
