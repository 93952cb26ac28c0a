"""The GGUF converter: the real SmolLM2 GGUF and tiny GGUFs of every tensor type read back and
compared with what transformers dequantizes from the same file, llama.cpp's Q/K permutation
undone exactly, the tokenizer variants encoding like transformers, and bad GGUF input.

    python3 -m pytest tests/test_convert_gguf.py
"""
from __future__ import annotations

import gguf
import pytest
import torch

from convert_helpers import TEXTS, as_shipped, no_leftovers, read_model, write_gguf
from gdsllm.convert.gguf import convert_gguf
from gdsllm.format.metadata import FormatError, load_model_meta

Q = gguf.GGMLQuantizationType


# --- the real model: SmolLM2-135M-Instruct Q4_1, via the default-model path ----------------------

# xdg_cache and smollm2_model (the default model, quantized, once per run) come from conftest.py.

@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' float32 load of the GGUF, shared with the compute tests (one ~18 s load)."""
    from llama_ref import smollm2
    return smollm2()[0]


@pytest.mark.slow
def test_smollm2_equals_transformers_dequantized(smollm2_transformers):
    from llama_ref import smollm2
    smollm2_model = smollm2()[2]  # convert_gguf(..., quant="none"): the float conversion
    ours = read_model(smollm2_model)
    ref = smollm2_transformers.state_dict()
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert torch.equal(ours[name], t), name
    meta = load_model_meta(smollm2_model)
    cfg = smollm2_transformers.config
    p = meta.params
    assert (p.vocab_size, p.hidden_size, p.intermediate_size, p.num_hidden_layers) == \
        (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
    assert (p.num_attention_heads, p.num_key_value_heads, p.head_dim) == (9, 3, 64)
    assert p.tie_word_embeddings and p.rope_theta == cfg.rope_parameters["rope_theta"]
    assert p.rms_norm_eps == cfg.rms_norm_eps and p.eos_token_ids == (cfg.eos_token_id,)
    assert meta.num_params == sum(v.numel() for v in smollm2_transformers.parameters())


@pytest.mark.slow
def test_smollm2_tokenizer_encodes_like_transformers(smollm2_model, smollm2_transformers):
    from llama_ref import smollm2
    from tokenizers import Tokenizer
    meta = load_model_meta(smollm2_model)
    ours = Tokenizer.from_file(str(smollm2_model / meta.tokenizer_file))
    ref = smollm2()[1]  # AutoTokenizer.from_pretrained(dir, gguf_file=...)
    for s in TEXTS:
        ids = ours.encode(s).ids
        assert ids == ref(s).input_ids, s
        assert ours.decode(ids, skip_special_tokens=False) == s
    assert meta.chat_template == ref.chat_template
    assert meta.params.bos_token_id == ref.bos_token_id and meta.params.eos_token_ids == (ref.eos_token_id,)


# --- tiny GGUFs written here: every tensor type, untied head, tokenizer variants ---------------

ALL_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.F16, "attn_output": Q.Q8_0,
             "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.F32, "output": Q.F16}


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_every_type_equals_transformers(tmp_path, tied):
    from transformers import AutoModelForCausalLM
    src = tmp_path / "tiny.gguf"
    hf = write_gguf(src, types=ALL_TYPES, tied=tied)
    ours = read_model(convert_gguf(src, tmp_path / "out"))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=src.name, dtype=torch.float32).state_dict()
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert torch.equal(ours[name], t), name
    # Against the un-quantized source: F32 tensors exactly, quantized ones to quantization error
    # (relative RMS error of 4-bit is ~0.1; a wrong Q/K row order would give ~1.4).
    for name, x in hf.items():
        x = torch.from_numpy(x)
        if "down_proj" in name or "norm" in name:
            assert torch.equal(ours[name], x), name
        else:
            assert (ours[name] - x).norm() / x.norm() < 0.3, name
    meta = load_model_meta(tmp_path / "out")
    assert [t.name for t in meta.units[-1].tensors] == ["norm.weight"] + ([] if tied else ["lm_head.weight"])
    assert meta.params.tie_word_embeddings == tied and meta.params.rope_theta == 50000.0
    assert meta.chat_template == "{{ messages[0]['content'] }}" and meta.source.startswith("gguf:")


def test_unpermute_inverts_llamacpp_exactly(tmp_path):
    hf = write_gguf(tmp_path / "f32.gguf")
    ours = read_model(convert_gguf(tmp_path / "f32.gguf", tmp_path / "out"))
    for name, x in hf.items():
        assert torch.equal(ours[name], torch.from_numpy(x)), name


@pytest.mark.parametrize("pre,add_bos,bos,spm", [
    ("llama-bpe", True, 1, False), ("smollm", False, 1, False), ("qwen2", True, 1, False),
    ("llama-bpe", True, 300, False), ("default", False, 5, False),
    ("default", None, 1, True), ("default", False, 1, True), ("llama-bpe", True, 1, True)])
def test_tiny_gguf_tokenizer_encodes_like_transformers(tmp_path, pre, add_bos, bos, spm):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    src = tmp_path / "tok.gguf"
    write_gguf(src, pre=pre, add_bos=add_bos, bos=bos, spm=spm)
    out = convert_gguf(src, tmp_path / "out")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = as_shipped(AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=src.name), pre, spm)
    bos_text = ours.decode([bos], skip_special_tokens=False)  # BOS may be an ordinary token
    for s in TEXTS + [f"x{bos_text}y {bos_text}", "<|user|> hi<s>x</s> <unk>", "the andthe  ing"]:
        ids = ours.encode(s).ids
        assert ids == ref(s).input_ids, (pre, s)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("case", ["arch", "qtype", "truncated", "not_gguf", "missing_tensor"])
def test_gguf_bad_input(tmp_path, case):
    src = tmp_path / "bad.gguf"
    if case == "arch":
        write_gguf(src, arch="gpt2")
        expect = "general.architecture is 'gpt2'"
    elif case == "qtype":
        write_gguf(src, types={"ffn_up": Q.MXFP4})
        expect = "tensor blk.0.ffn_up.weight has type MXFP4"
    elif case == "truncated":
        write_gguf(tmp_path / "ok.gguf")
        data = (tmp_path / "ok.gguf").read_bytes()
        src.write_bytes(data[: len(data) // 2])
        expect = "not a readable GGUF"
    elif case == "not_gguf":
        src.write_bytes(b"not a gguf file at all" * 100)
        expect = "not a readable GGUF"
    elif case == "missing_tensor":
        write_gguf(src, drop=("blk.1.ffn_gate.weight",))
        expect = "tensor blk.1.ffn_gate.weight not found"
    with pytest.raises(FormatError) as e:
        convert_gguf(src, tmp_path / "out")
    assert str(src) in str(e.value) and expect in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []
