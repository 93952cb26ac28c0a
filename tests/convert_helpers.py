"""Shared by the converter tests (and test_quant): a GdsLLM model read back tensor by tensor, tiny
llama GGUFs written with gguf-py (every tensor type, tied or untied head, BPE or sentencepiece
tokenizers), and the texts the tokenizers are compared on.

    from convert_helpers import read_model, write_gguf
    hf = write_gguf(tmp / "tiny.gguf", types={"attn_q": Q.Q4_0}); ours = read_model(convert_gguf(...))
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from gdsllm.format.metadata import load_model_meta, verify_unit
from gdsllm.format.storage import HostReader, aligned_host_buffer

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


TEXTS = ["Hello world", "  leading and trailing spaces  ", "naïve café — 日本語のテキスト 🤖🚀 Ελληνικά",
         "digits 1234567890 3.14159 -42 1e-5", "def f(x):\n    return x**2  # comment\n\tTab\r\n",
         "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n", "", " ", "\n\n\n",
         "a<|endoftext|>b<repo_name>c<empty_output>", "don't I'll we've THEY'RE", "x" * 300]


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


# Pre-tokenizer names whose models' own tokenizer.json differs from what transformers' GGUF loader
# builds: the digits-first family (StarCoder's and SmolLM's tokenizer.json: Digits, then
# ByteLevel; llama.cpp's llama-vocab.cpp splits them so), and the vocabularies with
# `ignore_merges` (Llama 3's and Tekken's tokenizer.json; llama.cpp sets it for these names).
DIGITS_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b",
                "mellum2")
IGNORING_MERGES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                   "lfm2", "jina-v5-nano", "tekken")


def as_shipped(ref, pre: str | None, spm: bool = False):
    """`ref` (transformers' tokenizer from a GGUF, `gguf_file=`) made to split and merge as the
    model's own tokenizer.json does for the pre-tokenizer name `pre` (`spm`: a sentencepiece
    vocabulary, Llama's: "\u2581" prepended to every stretch of text, even one that starts with a
    space, where transformers' Metaspace prepends none; `pre` is not used); returned."""
    from tokenizers import normalizers, pre_tokenizers
    backend = ref.backend_tokenizer
    if spm:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                   normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
        return ref
    if pre in DIGITS_FIRST:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in IGNORING_MERGES:
        backend.model.ignore_merges = True
    return ref
