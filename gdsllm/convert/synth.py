"""Synthetic LLaMA-shaped models with random weights, for benchmarks and tests.

    from gdsllm.convert.synth import synth
    synth("/tmp/llama7b", shape="llama-7b", dtype="float16", hf_out="/tmp/llama7b-hf")
    synth("/tmp/odd", shape="tiny", overrides={"num_key_value_heads": 1, "tie_word_embeddings": False})
    synth("/tmp/mixtral", shape="mixtral-8x7b", quant="int4")   # a mixture of experts, ~25 GB

Mixture-of-experts shapes (`mixtral-8x7b`, `qwen3-30b-a3b`, `tiny-moe`) are written with their
architecture, each expert its own unit; with `quant` ("int4" / "int8") the projections are drawn
directly as random integer codes with scales (no float copy, no rounding pass), so a 47B-parameter
model is written in minutes and fits a 64 GiB disk.

Weights are generated unit by unit from seeded `torch.Generator`s (one per tensor, seeded from
the model seed, unit index and tensor index), so a 13.8 GB LLaMA-7B never needs more than one
unit in RAM and the same seed always gives the same model. Matrices are normal with std 0.02,
norm weights 1 + small noise. With `hf_out`, the same (already cast) tensors are also written as a
Hugging Face directory: `config.json` (LlamaForCausalLM), one safetensors shard per unit with
`model.safetensors.index.json`, and the shared tokenizer (`gdsllm.convert.synth_tokenizer`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from gdsllm.quant.policy import target_qtype
from gdsllm.quant.schemes import SCALE_DTYPE, QTensor
from gdsllm.format.metadata import DTYPES, LlamaParams, unit_layout, unit_tensor_shapes
from gdsllm.format.quant_layout import data_nbytes, data_shape
from gdsllm.convert.synth_tokenizer import CHAT_TEMPLATE, BOS_ID, EOS_ID, synth_tokenizer_json, tokenizer_config
from gdsllm.convert.writer import ModelWriter, unit_progress

_BASE = dict(rms_norm_eps=1e-5, rope_scaling=None, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,))
SHAPES: dict[str, LlamaParams] = {
    "tiny": LlamaParams(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                        max_position_embeddings=512, tie_word_embeddings=False, **_BASE),
    "smollm2-135m": LlamaParams(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, **_BASE),
    "llama-7b": LlamaParams(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                            head_dim=128, rope_theta=10000.0, max_position_embeddings=4096,
                            tie_word_embeddings=False, **_BASE),
    "llama-13b": LlamaParams(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                             num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                             head_dim=128, rope_theta=10000.0, max_position_embeddings=4096,
                             tie_word_embeddings=False, **_BASE),
    "llama2-70b": LlamaParams(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                              head_dim=128, rope_theta=10000.0, max_position_embeddings=4096,
                              tie_word_embeddings=False, **_BASE),
    # mixtures of experts (gdsllm.models.moe): shapes of Mixtral 8x7B and Qwen3-30B-A3B
    "tiny-moe": LlamaParams(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                            max_position_embeddings=512, tie_word_embeddings=False, num_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
                            **_BASE),
    "mixtral-8x7b": LlamaParams(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=128, rope_theta=1e6, max_position_embeddings=32768,
                                tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                                moe_intermediate_size=14336, norm_topk_prob=True, **_BASE),
    "qwen3-30b-a3b": LlamaParams(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                 num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                 head_dim=128, rope_theta=1e6, max_position_embeddings=40960,
                                 tie_word_embeddings=False, qk_norm=True, num_experts=128,
                                 num_experts_per_tok=8, moe_intermediate_size=768,
                                 norm_topk_prob=True, **_BASE),
}
SHAPE_ARCH = {"tiny-moe": "mixtral", "mixtral-8x7b": "mixtral", "qwen3-30b-a3b": "qwen3_moe"}  # else llama
STD = 0.02
# Mixture-of-experts shapes: with every matrix at std 0.02 the attention's average over the context
# soon dominates the residual stream, every token looks alike to the routers, and routing collapses
# (measured on a 48-layer qwen3-30b-a3b-like shape, 45 rows: 92 distinct experts of 128 routed at
# layer 0, 22-37 from layer 12 on). Trained routers spread tokens over nearly all experts (a load
# balancing loss). So a MoE shape's embedding is drawn at std 1 and the matrices that write the
# residual stream (o_proj, down_proj) at STD * RESIDUAL_SCALE: the residual stays token-specific,
# routing stays spread, and a next-layer guess works about as well as on a trained model.
MOE_EMBED_STD, RESIDUAL_SCALE = 1.0, 0.1
THREADS = min(8, os.cpu_count() or 1)  # torch's normal_ fill is single-threaded: one tensor per thread


def synth_params(shape: str, layers: int | None = None, overrides: dict | None = None) -> LlamaParams:
    """The hyper-parameters of `shape`, with `layers` and any LlamaParams field overridden."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    o = dict(overrides or {})
    if layers is not None:
        o["num_hidden_layers"] = layers
    if "head_dim" not in o and ("hidden_size" in o or "num_attention_heads" in o):
        base = SHAPES[shape]
        o["head_dim"] = o.get("hidden_size", base.hidden_size) // o.get("num_attention_heads",
                                                                        base.num_attention_heads)
    if "eos_token_ids" in o:
        o["eos_token_ids"] = tuple(o["eos_token_ids"])
    p = replace(SHAPES[shape], **o)
    if p.num_hidden_layers < 1 or p.num_attention_heads % p.num_key_value_heads or p.head_dim % 2:
        raise ValueError(f"inconsistent shape: {p}")
    if p.vocab_size <= max(BOS_ID, EOS_ID):
        raise ValueError(f"vocab_size {p.vocab_size} is too small for the special tokens")
    return p


def _std(name: str, moe: bool) -> float:
    if moe and name == "embed_tokens.weight":
        return MOE_EMBED_STD
    if moe and name.endswith(("o_proj.weight", "down_proj.weight")):
        return STD * RESIDUAL_SCALE
    return STD


def _tensor(seed: int, unit: int, k: int, name: str, shape: tuple[int, ...], dt: torch.dtype,
            quant: str | None = None, group_size: int = 64, moe: bool = False
            ) -> torch.Tensor | QTensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + unit * 1009 + k) & 0x7FFF_FFFF_FFFF_FFFF)
    target = _std(name, moe)
    qtype = target_qtype(name, quant)  # the embedding and head too (int8): no RTN pass in the writer
    if qtype is not None:  # random codes, scaled to std `target`: no float copy, no rounding pass
        # int4 stands for (q - 8) * s + z: z = s / 2 centres the codes 0..15 on zero. With z = 0
        # every row had mean -s/2, a common mode that grew layer by layer until every token's
        # router picked the same experts (the 2026-11-28 MoE run read nothing after the prompt).
        lo, hi, std = (0, 16, 4.61) if qtype == "int4" else (-127, 128, 73.3)
        sc = torch.full((shape[0], shape[1] // group_size), target / std)
        zero = sc / 2 if qtype == "int4" else torch.zeros_like(sc)
        if qtype == "int4":
            return RandomInt4(shape, sc, zero, group_size, g)
        q = torch.randint(lo, hi, shape, generator=g, dtype=torch.int8)
        return QTensor(qtype, q, sc, zero, group_size).prepack()
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(0.0, target, generator=g)
    if name.endswith("norm.weight"):
        t += 1.0  # RMSNorm gains near 1, as in trained models
    return t.to(dt)


class RandomInt4(QTensor):
    """An int4 weight of uniformly random codes 0..15, drawn straight in the stored tile layout:
    uniform independent nibbles stay uniform and independent under the layout's permutation, so
    random bytes are the packed form of random codes. No [N, K] code tensor is drawn and none is
    packed (a LLaMA-2-70B block: 0.2 s instead of 8.6 s on one core); `q` is unpacked from the
    bytes only when asked for (`codes`, `dequantize`, `to_int8`)."""

    def __init__(self, shape: tuple[int, int], scale: torch.Tensor, zero: torch.Tensor,
                 group_size: int, generator: torch.Generator):
        words = torch.empty(data_nbytes("int4", shape) // 8, dtype=torch.int64)
        words.random_(-2 ** 63, None, generator=generator)  # all 64 bits uniform
        self.data = words.view(torch.int32).reshape(data_shape("int4", shape))
        super().__init__("int4", torch.zeros((), dtype=torch.uint8).expand(shape), scale, zero, group_size)

    def codes(self) -> torch.Tensor:
        """uint8 [N, K]: the codes 0..15 the packed bytes hold."""
        from gdsllm.quant.int4pack import unpack_int4
        return unpack_int4(self.data, self.shape)

    def dequantize(self) -> torch.Tensor:
        return QTensor("int4", self.codes(), self.scale, self.zero, self.group_size).dequantize()

    def to_int8(self) -> QTensor:
        return QTensor("int4", self.codes(), self.scale, self.zero, self.group_size).to_int8()

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        sc = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous()
        return self.data, sc.to(SCALE_DTYPE["int4"])


def _unit(p: LlamaParams, seed: int, index: int, kind: str, dt: torch.dtype, quant, group_size):
    return {n: _tensor(seed, index, k, n, s, dt, quant, group_size, p.num_experts > 0)
            for k, (n, s) in enumerate(unit_tensor_shapes(p, kind).items())}


def synth_units(p: LlamaParams, seed: int, dtype: str, quant: str | None = None, group_size: int = 64):
    """Yield (unit name, kind, {name: tensor in dtype, or QTensor with `quant`}) per unit (a tied
    head: the norm alone). Units are drawn (and packed) THREADS at a time, a few ahead of the
    writer: a MoE model is thousands of small expert units, so one unit at a time left the
    threads idle (qwen3-30b-a3b took 507 s on the GPU machine's 16 cores)."""
    dt, layout, ahead = DTYPES[dtype], unit_layout(p), 2 * THREADS
    with ThreadPoolExecutor(THREADS) as pool:
        futs = {}
        for index, (uname, kind, _) in enumerate(layout):
            for j in range(index, min(index + ahead, len(layout))):
                if j not in futs:
                    futs[j] = pool.submit(_unit, p, seed, j, layout[j][1], dt, quant, group_size)
            yield uname, kind, futs.pop(index).result()


def hf_config(p: LlamaParams, dtype: str) -> dict:
    rope = {"rope_theta": p.rope_theta, **(p.rope_scaling or {"rope_type": "default"})}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": dtype,
            "torch_dtype": dtype, "vocab_size": p.vocab_size, "hidden_size": p.hidden_size,
            "intermediate_size": p.intermediate_size, "num_hidden_layers": p.num_hidden_layers,
            "num_attention_heads": p.num_attention_heads, "num_key_value_heads": p.num_key_value_heads,
            "head_dim": p.head_dim, "hidden_act": "silu", "rms_norm_eps": p.rms_norm_eps,
            "max_position_embeddings": p.max_position_embeddings,
            "tie_word_embeddings": p.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
            "rope_parameters": rope, "rope_theta": p.rope_theta, "rope_scaling": p.rope_scaling,
            "bos_token_id": p.bos_token_id, "eos_token_id": list(p.eos_token_ids),
            "pad_token_id": None, "use_cache": True}


def _hf_names(kind: str, layer: int | None, tensors: dict) -> dict[str, torch.Tensor]:
    """Hugging Face names (a tied checkpoint has no lm_head.weight, nor does a tied head unit)."""
    out = {}
    for name, t in tensors.items():
        if kind == "block":
            out[f"model.layers.{layer}.{name}"] = t
        else:
            out[name if name == "lm_head.weight" else f"model.{name}"] = t
    return out


class _HFWriter:
    """Writes the Hugging Face twin into a temp dir beside `dst`, renamed into place at the end."""

    def __init__(self, dst: Path, p: LlamaParams, dtype: str):
        self.dst, self.p, self.dtype = dst, p, dtype
        if dst.exists():
            raise FileExistsError(f"{dst}: already exists (remove it or pick another path)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        self.n = len(unit_layout(p))
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.i = 0

    def add(self, kind: str, layer: int | None, tensors: dict) -> None:
        self.i += 1
        shard = f"model-{self.i:05d}-of-{self.n:05d}.safetensors"
        named = _hf_names(kind, layer, tensors)
        save_file({k: v.contiguous() for k, v in named.items()}, str(self.tmp / shard),
                  metadata={"format": "pt"})
        for k, v in named.items():
            self.weight_map[k] = shard
            self.total += v.numel() * v.element_size()

    def finish(self) -> None:
        d = self.tmp
        (d / "config.json").write_text(json.dumps(hf_config(self.p, self.dtype), indent=2))
        (d / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": self.p.bos_token_id, "eos_token_id": list(self.p.eos_token_ids)}, indent=2))
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=2))
        (d / "tokenizer.json").write_bytes(synth_tokenizer_json(self.p.vocab_size))
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
        os.rename(d, self.dst)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def synth(dst: str | os.PathLike, shape: str = "tiny", *, layers: int | None = None, seed: int = 0,
          dtype: str = "float16", hf_out: str | os.PathLike | None = None,
          overrides: dict | None = None, progress: bool = False, quant: str | None = None,
          group_size: int = 64) -> Path:
    """Write a random model of `shape` to `dst` (and its Hugging Face twin to `hf_out`);
    `quant` "int4" / "int8": projections drawn quantized (gdsllm.quant.policy says which)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    quant = None if quant in (None, "none") else quant
    target_qtype("", quant)  # ValueError on an unknown qtype
    arch = SHAPE_ARCH.get(shape, "llama")
    if hf_out is not None and (arch != "llama" or quant):
        raise ValueError(f"--hf-out writes LLaMA float shapes only, not {shape!r}"
                         f"{' with --quant ' + quant if quant else ''}")
    p = synth_params(shape, layers, overrides)
    hf = _HFWriter(Path(hf_out).expanduser().resolve(), p, dtype) if hf_out is not None else None
    try:
        source = f"synth:{shape}:seed={seed}" + (f":overrides={json.dumps(overrides, sort_keys=True)}"
                                                 if overrides else "")
        with ModelWriter(dst, p, dtype, chat_template=CHAT_TEMPLATE, source=source, architecture=arch,
                         quant=quant, group_size=group_size) as w:
            units = synth_units(p, seed, dtype, quant, group_size)
            for (_, kind, layer), (_, _, tensors) in unit_progress(
                    zip(unit_layout(p), units), len(unit_layout(p)), f"synth {shape}", progress):
                w.add_unit(tensors)
                if hf is not None:
                    hf.add(kind, layer, tensors)
                del tensors  # one unit in memory at a time
            w.add_file("tokenizer.json", synth_tokenizer_json(p.vocab_size), tokenizer=True)
        if hf is not None:
            hf.finish()
    except BaseException:
        if hf is not None:
            hf.abort()
        raise
    return w.dst
