"""Converts a llama.cpp GGUF file into the GdsLLM weight format: architectures llama (and Mistral,
which llama.cpp writes as llama), qwen2, qwen3 and gemma3 (`gdsllm.convert.families`).

    from gdsllm.convert.gguf import convert_gguf
    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "~/models/smollm2", dtype="float32")

Tensors (F32, F16, BF16 and the Q4_0 ... Q8_0, K-quant block types) are dequantized with
`gguf.quants.dequantize` (the function transformers' GGUF loader uses, so values agree bit for
bit), one unit at a time from the memory-mapped file. Tensor names come from gguf-py's own table,
as transformers' loader gets them. llama.cpp stores a llama's Q and K rows permuted for its rotary
layout; they are permuted back exactly as transformers' `LlamaTensorProcessor` does; it stores
Gemma's RMSNorm weights as (1 + w): 1 is subtracted back as `Gemma2TensorProcessor` does.
Hyper-parameters come from the `{arch}.*` keys, the tokenizer from `tokenizer.ggml.*` (see
`gdsllm.convert.gguf_tokenizer`), the chat template from `tokenizer.chat_template`.

With `quant=None` (the CLI's default for a GGUF) quantized tensors stay quantized: Q4_0, Q4_1 and
Q4_K blocks become int4, Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 int8 (`gdsllm.quant.gguf_blocks`, read
from the memory-mapped blocks, no float copy); with "int4" / "int8" every projection is stored in
that qtype (`gdsllm.quant.policy`); "none" (the Python default) dequantizes to `dtype` as above.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gdsllm.convert.families import GGUF_ARCHITECTURES, gguf_expert_stem, gguf_family, gguf_tensor_name
from gdsllm.format.family_params import expert_index
from gdsllm.format.family_params import family_problem
from gdsllm.format.metadata import DTYPES, FormatError, LlamaParams, unit_layout, unit_tensor_shapes
from gdsllm.convert.gguf_tokenizer import gguf_field, gguf_tokenizer_json
from gdsllm.convert.writer import ModelWriter, unit_progress
from gdsllm.quant.gguf_blocks import NATIVE, check_keepable, decode_named
from gdsllm.quant.schemes import QTensor

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                   "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M")
# GdsLLM's top-level tensor names -> GGUF's
TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def open_gguf(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise FormatError(f"{path}: not found") from None
    except Exception as e:  # ValueError / struct errors on a truncated or foreign file
        raise FormatError(f"{path}: not a readable GGUF file: {e}") from None


def params_from_gguf(reader, path: Path) -> tuple[str, str, LlamaParams]:
    """(GGUF architecture, GdsLLM architecture, hyper-parameters) of the GGUF `reader` reads."""
    garch = gguf_field(reader, "general.architecture")
    if garch not in GGUF_ARCHITECTURES:
        raise FormatError(f"{path}: general.architecture is {garch!r}; GdsLLM converts "
                          f"{', '.join(GGUF_ARCHITECTURES)} GGUFs")

    def opt(key: str, default=None):
        return gguf_field(reader, f"{garch}.{key}", default)

    def get(key: str):
        v = opt(key)
        if v is None:
            raise FormatError(f"{path}: missing hyper-parameter {garch}.{key}")
        return v

    names = {t.name for t in reader.tensors}
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_layers = int(get("block_count"))
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = opt("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if emb is None:
            raise FormatError(f"{path}: tensor token_embd.weight not found")
        vocab = int(emb.shape[-1])
    scaling = None
    rope_type = opt("rope.scaling.type")
    if rope_type not in (None, "none"):
        if rope_type != "linear":
            raise FormatError(f"{path}: {garch}.rope.scaling.type {rope_type!r} is not supported "
                              f"(only 'linear')")
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    head_dim = int(opt("attention.key_length") or opt("rope.dimension_count") or hidden // heads)
    arch, fam = gguf_family(garch, opt, hidden, heads, n_layers, head_dim, names,
                            str(gguf_field(reader, "general.name", "") or ""))
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos = [gguf_field(reader, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
    p = LlamaParams(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=n_layers, num_attention_heads=heads,
        num_key_value_heads=int(opt("attention.head_count_kv") or heads), head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(opt("rope.freq_base", 10000.0)),
        max_position_embeddings=int(opt("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names, rope_scaling=scaling,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)), **fam)
    if (problem := family_problem(p)) is not None:
        raise FormatError(f"{path}: {problem}")
    return garch, arch, p


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation of a Q (n_head = heads) or K (n_head = KV heads)
    weight: rows go from (head, pair, 2) back to Hugging Face's (head, 2, pair) halves."""
    dim = w.shape[0] // n_head // 2
    assert n_head * dim * 2 == w.shape[0], (w.shape, n_head)
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFTensors:
    """Dequantized tensors of a GGUF by name, read one at a time from the memory-mapped file."""

    def __init__(self, reader, path: Path, garch: str, p: LlamaParams, keep_quant: bool = False):
        self.path, self.garch, self.p, self.keep_quant = path, garch, p, keep_quant
        self.by_name = {t.name: t for t in reader.tensors}
        for t in reader.tensors:  # fail before writing anything, not at the last block
            used = t.name.startswith("blk.") or t.name in TOP_NAMES.values()
            if used and keep_quant:
                check_keepable(path, t.name, t.tensor_type.name)
            elif used and t.tensor_type.name not in SUPPORTED_TYPES:
                raise FormatError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; GdsLLM "
                                  f"converts {', '.join(SUPPORTED_TYPES)}")
        wanted = {self.name("block", 0, n) for n in unit_tensor_shapes(p, "block")}
        wanted |= {self.name("expert", 0, n) for n in unit_tensor_shapes(p, "expert")} if p.num_experts else set()
        self._stack: tuple[str, object] | None = None  # the last 3-D expert tensor, dequantized
        extra = sorted(n for n in self.by_name if n.startswith("blk.0.") and n not in wanted)
        if extra:  # converting without them would be silently wrong
            raise FormatError(f"{path}: tensors {extra} are not used by a {garch} model of GdsLLM")

    def name(self, kind: str, layer: int | None, name: str) -> str:
        """The GGUF name of GdsLLM tensor `name` of a unit (an expert's: its layer's 3-D tensor)."""
        if kind == "expert":
            return gguf_tensor_name(self.garch, self.p.num_hidden_layers,
                                    f"model.layers.{layer}.{gguf_expert_stem(name)}.weight")
        if kind == "block":
            return gguf_tensor_name(self.garch, self.p.num_hidden_layers, f"model.layers.{layer}.{name}")
        return TOP_NAMES[name]

    def get(self, gname: str, shape: tuple[int, ...]) -> torch.Tensor:
        from gguf.quants import dequantize
        t = self.by_name.get(gname)
        if t is None:
            raise FormatError(f"{self.path}: tensor {gname} not found")
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise FormatError(f"{self.path}: tensor {gname} has type {qtype}; GdsLLM converts "
                              f"{', '.join(SUPPORTED_TYPES)}")
        if self.keep_quant and qtype in NATIVE:  # the blocks' values as they are, no float copy
            return self.fix(gname, decode_named(self.path, gname, t, shape))
        # np.array copies: F32 data is a read-only view of the memory-mapped file.
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if w.numel() != int(np.prod(shape)):
            raise FormatError(f"{self.path}: tensor {gname} has {w.numel()} values, the "
                              f"hyper-parameters say shape {shape}")
        return self.fix(gname, w.reshape(shape))

    def expert(self, gname: str, j: int, shape: tuple[int, ...]):
        """Expert j's slice [shape] of the 3-D tensor `gname` holding all of a layer's experts;
        quantized blocks stay quantized where `keep_quant` allows (sliced, no float copy)."""
        from gdsllm.quant.gguf_blocks import decode
        t = self.by_name.get(gname)
        if t is None:
            raise FormatError(f"{self.path}: tensor {gname} not found")
        if self.keep_quant and t.tensor_type.name in NATIVE:
            try:
                return decode(t.tensor_type.name, t.data[j], shape)
            except ValueError as e:
                raise FormatError(f"{self.path}: tensor {gname} expert {j}: {e}") from None
        if self._stack is None or self._stack[0] != gname:  # dequantized once per layer
            self._stack = (gname, self.get(gname, (self.p.num_experts, *shape)))
        return self._stack[1][j].clone()

    def fix(self, gname: str, w):
        """Undo llama.cpp's storage conventions (as transformers' tensor processors do)."""
        if self.garch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            heads = self.p.num_attention_heads if ".attn_q." in gname else self.p.num_key_value_heads
            if isinstance(w, QTensor):  # rows move with their scales and zeros
                return QTensor(w.qtype, unpermute(w.q, heads), unpermute(w.scale, heads),
                               unpermute(w.zero, heads), w.group_size)
            return unpermute(w, heads)
        if self.garch == "gemma3" and gname.endswith("norm.weight"):
            return w - 1  # stored as (1 + w)
        return w


def gguf_units(src: GGUFTensors, p: LlamaParams):
    """Yield (unit name, {tensor name: float32 tensor}) per unit, in file order. One tensor at a
    time is dequantized; a step that keeps blocks quantized replaces `src.get` here."""
    for uname, kind, layer in unit_layout(p):
        # A tied model (no output.weight) has no lm_head.weight: the embedding is stored once.
        if kind == "expert":
            tensors = {name: src.expert(src.name(kind, layer, name), expert_index(uname), shape)
                       for name, shape in unit_tensor_shapes(p, kind).items()}
        else:
            tensors = {name: src.get(src.name(kind, layer, name), shape)
                       for name, shape in unit_tensor_shapes(p, kind).items()}
        yield uname, tensors


def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float32",
                 progress: bool = False, overwrite: bool = False, quant: str | None = "none",
                 group_size: int = 64, quant_device: str | None = None) -> Path:
    """Convert the GGUF file `src` into a GdsLLM model at `dst`; returns `dst`. `quant`: None
    keeps quantized blocks as they are, "int4"/"int8" quantizes, "none" dequantizes to `dtype`."""
    src = Path(src).expanduser().resolve()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not src.is_file():
        raise FormatError(f"{src}: not found (a .gguf file is expected)")
    reader = open_gguf(src)
    garch, arch, p = params_from_gguf(reader, src)
    tensors = GGUFTensors(reader, src, garch, p, keep_quant=quant != "none")  # these two fail early
    tokenizer = gguf_tokenizer_json(reader, src)
    with ModelWriter(dst, p, dtype, chat_template=gguf_field(reader, "tokenizer.chat_template"),
                     source=f"gguf:{src}", overwrite=overwrite, architecture=arch,
                     quant=None if quant == "none" else quant, group_size=group_size,
                     quant_device=quant_device) as w:
        units = gguf_units(tensors, p)
        for _, tensors in unit_progress(units, len(unit_layout(p)), f"convert {src.name}", progress):
            w.add_unit(tensors)
            del tensors  # one unit in memory at a time
        w.add_file("tokenizer.json", tokenizer, tokenizer=True)
    return w.dst
