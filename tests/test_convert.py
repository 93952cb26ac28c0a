"""Converters: Hugging Face safetensors and GGUF into the GdsLLM format, read back and compared with
the source (GGUF: with what transformers dequantizes from the same file), bad inputs, the CLI, and
the embedded default model's one-time conversion.

    python3 -m pytest tests/test_convert.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gdsllm.convert import default_model
from gdsllm.convert.gguf import convert_gguf
from gdsllm.convert.hf import convert_hf
from gdsllm.format.metadata import FormatError, load_model_meta, verify_unit
from gdsllm.format.storage import HostReader, aligned_host_buffer
from gdsllm.convert.synth import synth, synth_params

ROOT = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType


def read_model(root) -> dict[str, torch.Tensor]:
    """Every tensor of a GdsLLM model, read with O_DIRECT and checksum-verified, by HF name (a
    tied model's lm_head.weight is its embedding, as transformers' state_dict shows it)."""
    meta = load_model_meta(root)
    out = {}
    with HostReader(direct=True) as r:
        for u in meta.units:
            buf = aligned_host_buffer(u.nbytes)
            r.read(meta.path(u), buf, u.nbytes)
            verify_unit(meta, u, buf)
            for t in u.tensors:
                assert t.offset % 4096 == 0
                v = buf[t.offset: t.offset + t.nbytes].view(getattr(torch, t.dtype)).reshape(t.shape)
                prefix = f"model.layers.{u.layer}." if u.kind == "block" else \
                    ("" if t.name == "lm_head.weight" else "model.")
                out[prefix + t.name] = v.clone()
    if meta.params.tie_word_embeddings:
        assert "lm_head.weight" not in out, "a tied model stores its embedding once"
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


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


TEXTS = ["Hello world", "  leading and trailing spaces  ", "naïve café — 日本語のテキスト 🤖🚀 Ελληνικά",
         "digits 1234567890 3.14159 -42 1e-5", "def f(x):\n    return x**2  # comment\n\tTab\r\n",
         "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n", "", " ", "\n\n\n",
         "a<|endoftext|>b<repo_name>c<empty_output>", "don't I'll we've THEY'RE", "x" * 300]


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


@pytest.mark.slow
def test_default_model_converts_once_and_is_reused(smollm2_model, xdg_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg_cache))
    before = default_model.conversions
    mtimes = {p.name: p.stat().st_mtime_ns for p in smollm2_model.iterdir()}
    assert default_model.resolve_model(None) == smollm2_model
    assert default_model.default_model_dir() == smollm2_model
    assert default_model.conversions == before
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_model.iterdir()} == mtimes
    assert smollm2_model.parent == xdg_cache / "gdsllm" and no_leftovers(smollm2_model.parent) == []


# --- tiny GGUFs written here: every tensor type, untied head, tokenizer variants ---------------

def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def spm_vocab(vocab: int) -> tuple[list[str], list[int], list[float]]:
    """A sentencepiece-style vocabulary as llama.cpp stores it: <unk> <s> </s>, 256 byte tokens,
    then pieces with "\u2581" for spaces, scored so that shorter, commoner pieces merge first."""
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    chars = list("\u2581etaoinsrhldcumfpgwybvkxjqzETAOINS0123456789.,!?'-")
    pieces = chars + [a + b for a in chars[:20] for b in chars[:20]]
    pieces += ["\u2581the", "\u2581and", "ing", "\u2581\u2581\u2581\u2581", "<|user|>"]
    for piece in pieces:
        if len(tokens) < vocab and piece not in tokens:
            tokens.append(piece)
            types.append(4 if piece == "<|user|>" else 1)
    while len(tokens) < vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)  # unused
    scores = [0.0] * 259 + [-float(i) for i in range(vocab - 259)]
    return tokens, types, scores


RAW_F16_FIELDS = {Q.Q8_1: (0,), Q.IQ4_NL: (0,)}  # byte offsets of each block's float16 scales


def random_blocks(shape: tuple[int, int], qt: Q, rng) -> np.ndarray:
    """Random raw blocks of type `qt`, their float16 scales set to a small finite value."""
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    for off in RAW_F16_FIELDS[qt]:
        raw[..., off:off + 2] = np.array([0.002], dtype=np.float16).view(np.uint8)
    return raw.reshape(shape[0], -1)


def write_gguf(path: Path, *, arch: str = "llama", types: dict[str, Q] | None = None, tied: bool = False,
               pre: str = "smollm", add_bos: bool | None = False, seed: int = 0,
               drop: tuple[str, ...] = (), bos: int = 1, spm: bool = False) -> dict[str, np.ndarray]:
    """A tiny llama GGUF (2 blocks, GQA 4/2); returns the float32 HF-layout weights it encodes."""
    from tokenizers import Tokenizer
    from gdsllm.convert.synth_tokenizer import synth_tokenizer_json
    h, ffn, heads, kv, hd, vocab, n = 64, 128, 4, 2, 16, (800 if spm else 320), 2
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test")
    w.add_block_count(n), w.add_context_length(256), w.add_embedding_length(h)
    w.add_feed_forward_length(ffn), w.add_head_count(heads), w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(50000.0), w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    if spm:
        tokens, token_types, scores = spm_vocab(vocab)
        w.add_tokenizer_model("llama"), w.add_tokenizer_pre(pre)
        w.add_token_list(tokens), w.add_token_types(token_types)
        w.add_token_scores(scores)
        w.add_unk_token_id(0), w.add_bos_token_id(1), w.add_eos_token_id(2)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
    else:
        tj = json.loads(Tokenizer.from_str(synth_tokenizer_json(vocab).decode()).to_str())
        tokens = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
        w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        # 0-2 control; token 5 marked user-defined; BOS is id 1 unless `bos` says otherwise.
        w.add_token_types([3, 3, 3] + [4 if i == 5 else 1 for i in range(3, vocab)])
        w.add_token_merges([" ".join(m) for m in tj["model"]["merges"]])
        w.add_bos_token_id(bos), w.add_eos_token_id(2), w.add_add_bos_token(bool(add_bos))
    w.add_chat_template("{{ messages[0]['content'] }}")
    hf: dict[str, np.ndarray] = {}
    plan = [("token_embd.weight", "model.embed_tokens.weight", (vocab, h))]
    for i in range(n):
        for g, name, shape in [("attn_norm", "input_layernorm", (h,)), ("attn_q", "self_attn.q_proj", (h, h)),
                               ("attn_k", "self_attn.k_proj", (kv * hd, h)),
                               ("attn_v", "self_attn.v_proj", (kv * hd, h)),
                               ("attn_output", "self_attn.o_proj", (h, h)),
                               ("ffn_norm", "post_attention_layernorm", (h,)),
                               ("ffn_gate", "mlp.gate_proj", (ffn, h)), ("ffn_up", "mlp.up_proj", (ffn, h)),
                               ("ffn_down", "mlp.down_proj", (h, ffn))]:
            plan.append((f"blk.{i}.{g}.weight", f"model.layers.{i}.{name}.weight", shape))
    plan.append(("output_norm.weight", "model.norm.weight", (h,)))
    if not tied:
        plan.append(("output.weight", "lm_head.weight", (vocab, h)))
    for gname, name, shape in plan:
        x = rng.standard_normal(shape, dtype=np.float32) * (0.02 if len(shape) == 2 else 1)
        hf[name] = x
        if ".attn_q." in gname or ".attn_k." in gname:
            x = llamacpp_permute(x, heads if ".attn_q." in gname else kv)
        if gname in drop:
            continue
        qt = (types or {}).get(gname.split(".")[-2], Q.F32)
        if qt == Q.F32 or len(shape) == 1:
            w.add_tensor(gname, x)
        elif qt == Q.F16:
            w.add_tensor(gname, x.astype(np.float16))
        elif qt in RAW_F16_FIELDS:  # gguf-py cannot quantize into it: random blocks
            w.add_tensor(gname, random_blocks(shape, qt, rng), raw_dtype=qt)
        else:
            w.add_tensor(gname, gguf.quants.quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return hf


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
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=src.name)
    bos_text = ours.decode([bos], skip_special_tokens=False)  # BOS may be an ordinary token
    for s in TEXTS + [f"x{bos_text}y {bos_text}", "<|user|> hi<s>x</s> <unk>", "the andthe  ing"]:
        ids = ours.encode(s).ids
        assert ids == ref(s).input_ids, (pre, s)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


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


def _cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdsllm", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kw)


def test_cli_convert_errors_and_success(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    r = _cli("convert", tmp_path / "gpt2.gguf", tmp_path / "out")
    assert r.returncode == 1 and "gpt2.gguf" in r.stderr and "architecture" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("convert", tmp_path / "missing.gguf", tmp_path / "out")
    assert r.returncode == 1 and "missing.gguf" in r.stderr
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []
    write_gguf(tmp_path / "ok.gguf", types={"attn_q": Q.Q8_0})
    r = _cli("convert", tmp_path / "ok.gguf", tmp_path / "out", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert load_model_meta(tmp_path / "out").dtype == "bfloat16"
    r = _cli("convert", tmp_path / "ok.gguf", tmp_path / "out")
    assert r.returncode == 1 and "already exists" in r.stderr


@pytest.mark.slow
def test_cli_convert_ctrl_c_leaves_nothing(tmp_path, smollm2_gguf):
    p = subprocess.Popen([sys.executable, "-m", "gdsllm", "convert", str(smollm2_gguf), str(tmp_path / "out"),
                          "--dtype", "float32"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(".tmp-" in n.name for n in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until the writer's temp dir exists, i.e. conversion is under way
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err.decode()
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


# --- the default-model cache: lock, stale entries, resolve_model -----------------------------

def test_default_model_lock_converts_once_across_processes(tmp_path):
    write_gguf(tmp_path / "pkg.gguf", types={"attn_q": Q.Q4_1})
    code = ("import sys; from pathlib import Path; from gdsllm.convert import default_model as d; "
            f"d.default_gguf = lambda: Path({str(tmp_path / 'pkg.gguf')!r}); "
            "print(d.default_model_dir(progress=False), d.conversions)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({o[0] for o in outs}) == 1 and sorted(int(o[1]) for o in outs) == [0, 0, 1]
    assert no_leftovers(tmp_path / "cache" / "gdsllm") == []


def test_default_model_stale_cache_is_reconverted(tmp_path, monkeypatch):
    write_gguf(tmp_path / "pkg.gguf")
    monkeypatch.setattr(default_model, "default_gguf", lambda: tmp_path / "pkg.gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = default_model.resolve_model(None, progress=False)
    n = default_model.conversions
    (first / "metadata.json").write_text("{}")  # e.g. an older format
    (first.parent / f".{first.name}.tmp-killed").mkdir()  # leftover of a killed conversion
    assert default_model.resolve_model(None, progress=False) == first
    assert default_model.conversions == n + 1
    load_model_meta(first)
    assert no_leftovers(first.parent) == []


def test_default_model_with_a_tied_copy_is_reconverted(tmp_path, monkeypatch):
    """A cached default model written when the head held a copy of the tied embedding still loads,
    but is converted again once, to store the table once."""
    from dataclasses import replace

    from gdsllm.format.writer import ModelWriter
    from llama_ref import resident_weights
    write_gguf(tmp_path / "pkg.gguf", tied=True)
    monkeypatch.setattr(default_model, "default_gguf", lambda: tmp_path / "pkg.gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = default_model.resolve_model(None, progress=False)
    meta = load_model_meta(first)
    assert [t.name for t in meta.units[-1].tensors] == ["norm.weight"]
    w = resident_weights(meta)  # rewrite it as it was: untied with a copy, then marked tied
    with ModelWriter(first, replace(meta.params, tie_word_embeddings=False), meta.dtype,
                     overwrite=True) as mw:
        for u in meta.units:
            mw.add_unit({**w[u.name], **({"lm_head.weight": w["embed"]["embed_tokens.weight"]}
                                          if u.kind == "head" else {})})
    doc = json.loads((first / "metadata.json").read_text())
    doc["config"]["tie_word_embeddings"] = True
    (first / "metadata.json").write_text(json.dumps(doc))
    assert load_model_meta(first).units[-1].nbytes > meta.units[-1].nbytes  # loads, with the copy
    n = default_model.conversions
    assert default_model.resolve_model(None, progress=False) == first
    assert default_model.conversions == n + 1
    assert load_model_meta(first).units[-1].nbytes == meta.units[-1].nbytes
    assert default_model.resolve_model(None, progress=False) == first and default_model.conversions == n + 1


def test_resolve_model_paths(tmp_path):
    out = synth(tmp_path / "m", "tiny")
    assert default_model.resolve_model(str(out)) == out
    with pytest.raises(FileNotFoundError, match="nope"):
        default_model.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(FormatError, match="gdsllm convert"):
        default_model.resolve_model(str(tmp_path / "x.gguf"))
