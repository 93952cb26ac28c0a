"""Converts a Hugging Face directory (safetensors) into the GdsLLM weight format: LLaMA, Qwen2/2.5,
Qwen3, Mistral and Gemma 3 text checkpoints (`gdsllm.convert.families` reads each one's config).

    from gdsllm.convert.hf import convert_hf
    convert_hf("~/models/Llama-3.2-1B", "~/models/llama-3.2-1b.gdsllm", dtype="float16")

The source is what `save_pretrained` writes for a `*ForCausalLM`: `config.json`,
`model.safetensors` or shards with `model.safetensors.index.json`, `tokenizer.json`,
`tokenizer_config.json` (chat template; transformers 5 may put it in `chat_template.jinja`) and
`generation_config.json` (end-of-sequence ids). Tensors are read lazily with `safe_open`
(memory-mapped), one unit at a time, so the model is never whole in RAM.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from gdsllm.convert.families import HF_DEFAULTS, gemma3_rope, hf_architecture, hf_family, hf_tensor_key
from gdsllm.format.family_params import expert_index
from gdsllm.format.family_params import family_problem
from gdsllm.format.metadata import DTYPES, FormatError, LlamaParams, unit_layout, unit_tensor_shapes
from gdsllm.models.layers import rope_inv_freq
from gdsllm.convert.writer import ModelWriter, unit_progress

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
SOURCE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}  # what we can convert losslessly


def _read_json(path: Path, required: bool = True) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise FormatError(f"{path}: not found; is {path.parent} a Hugging Face model directory?") from None
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: top level is not an object")
    return doc


def _ids(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def rope_from_config(cfg: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from transformers 5 `rope_parameters` or the older
    top-level `rope_theta` / `rope_scaling` keys."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        theta = float(rp.get("rope_theta", cfg.get("rope_theta", default_theta)))
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", default_theta))
        scaling = dict(cfg.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # pre-4.45 spelling
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def params_from_config(cfg: dict, gen: dict | None, where: Path) -> tuple[str, LlamaParams]:
    """(GdsLLM architecture, hyper-parameters) of a Hugging Face config; FormatError naming the
    field for anything unsupported."""
    arch = hf_architecture(cfg, where)
    d = HF_DEFAULTS[arch]
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        if arch == "gemma3":
            theta, scaling, local = gemma3_rope(cfg, where)
        else:
            (theta, scaling), local = rope_from_config(cfg, d["rope_theta"]), None
        eos = _ids((gen or {}).get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
        bos = cfg.get("bos_token_id", (gen or {}).get("bos_token_id"))
        p = LlamaParams(
            vocab_size=int(cfg.get("vocab_size") or d["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", d["max_position_embeddings"])),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", d["tie_word_embeddings"])),
            rope_scaling=scaling, bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(dict.fromkeys(eos)),  # de-duplicated, order kept
            rope_local_theta=local, **hf_family(arch, cfg, where))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: malformed or missing hyper-parameter: {e}") from None
    if (problem := family_problem(p)) is not None:
        raise FormatError(f"{where}: {problem}")
    try:  # an unimplemented rope type fails here, before anything is written
        for kind in {p.layer_rope(i) for i in range(p.num_hidden_layers)}:
            rope_inv_freq(p, kind)
    except (KeyError, ValueError) as e:
        raise FormatError(f"{where}: rope_scaling / rope_parameters: {e}") from None
    return arch, p


def chat_template_of(src: Path) -> str | None:
    """The chat template: `chat_template.jinja` if present, else `tokenizer_config.json`'s."""
    if (src / CHAT_TEMPLATE).is_file():
        return (src / CHAT_TEMPLATE).read_text()
    tc = _read_json(src / TOKENIZER_CONFIG, required=False) or {}
    t = tc.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


class SafetensorsDir:
    """Lazy access to the tensors of a safetensors checkpoint, by Hugging Face name."""

    def __init__(self, src: Path):
        self.src = src
        index = _read_json(src / INDEX, required=False)
        if index is not None:
            wm = index.get("weight_map")
            if not isinstance(wm, dict):
                raise FormatError(f"{src / INDEX}: missing 'weight_map' object")
            self.where = {k: src / v for k, v in wm.items()}
        else:
            files = [src / SINGLE] if (src / SINGLE).is_file() else sorted(src.glob("*.safetensors"))
            if not files:
                raise FormatError(f"{src / SINGLE}: not found (nor {INDEX}, nor any *.safetensors)")
            self.where = {}
            for f in files:
                for k in self._open(f).keys():
                    self.where[k] = f
        self._handles: dict[Path, object] = {}

    def _open(self, f: Path):
        try:
            return safe_open(str(f), framework="pt")
        except FileNotFoundError:
            raise FormatError(f"{f}: not found (listed in {INDEX})") from None
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise FormatError(f"{f}: not a readable safetensors file: {e}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        f = self.where.get(name)
        if f is None:
            raise FormatError(f"{self.src}: tensor {name!r} not found in any safetensors file")
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = self._open(f)
        try:
            dt = h.get_slice(name).get_dtype()
        except Exception as e:
            raise FormatError(f"{f}: tensor {name!r} missing or unreadable: {e}") from None
        t = h.get_tensor(name)  # copies this tensor only (the file is memory-mapped)
        if t.dtype not in SOURCE_DTYPES:
            raise FormatError(f"{f}: tensor {name!r} has unsupported dtype {dt} "
                              f"(GdsLLM converts F32, F16 and BF16 checkpoints)")
        return t


def _unit_keys(p: LlamaParams, arch: str):
    """(unit name, {GdsLLM tensor name: Hugging Face name}) of every unit, in file order."""
    for uname, kind, layer in unit_layout(p):
        yield uname, {name: hf_tensor_key(arch, kind, layer, expert_index(uname), name)
                      for name in unit_tensor_shapes(p, kind)}


def hf_units(src: Path, p: LlamaParams, arch: str = "llama"):
    """Yield (unit name, {tensor name: tensor}) for each unit, in file order, reading lazily. A
    tied model's head unit has no lm_head.weight: the embedding is stored once."""
    st = SafetensorsDir(src)
    _check_no_unused(st, p, arch, src)
    for uname, keys in _unit_keys(p, arch):
        tensors = {}
        for name, key in keys.items():
            if key not in st and key.startswith("model.") and key[6:] in st:
                key = key[6:]  # a bare LlamaModel checkpoint without the "model." prefix
            if key == "lm_head.weight" and key not in st:
                raise FormatError(f"{src}: tensor 'lm_head.weight' not found and config.json says "
                                  f"tie_word_embeddings=false")
            tensors[name] = st.get(key)
        yield uname, tensors


def _check_no_unused(st: SafetensorsDir, p: LlamaParams, arch: str, src: Path) -> None:
    """A block tensor the config does not account for (a bias with attention_bias=false, ...)
    would be dropped and the model silently wrong: refuse instead."""
    wanted = {k.removeprefix("model.") for _, keys in _unit_keys(p, arch) for k in keys.values()}
    for key in st.where:
        parts = key.split(".")
        if "layers" in parts and parts.index("layers") + 2 <= len(parts):
            bare = ".".join(parts[parts.index("layers"):])
            if bare not in wanted and not key.endswith("rotary_emb.inv_freq"):
                raise FormatError(f"{src}: tensor {key!r} is not used by a {p.num_hidden_layers}-layer "
                                  f"model with this config.json (attention_bias / mlp_bias?); "
                                  f"converting without it would be wrong")


def convert_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float32",
               progress: bool = False, overwrite: bool = False, quant: str = "none",
               group_size: int = 64, quant_device: str | None = None) -> Path:
    """Convert the Hugging Face directory `src` into a GdsLLM model at `dst`; returns `dst`.
    `quant` "int4" / "int8": group-wise round-to-nearest at write time (gdsllm.quant.policy),
    computed on `quant_device` ("cuda": the same bytes, much faster)."""
    src = Path(src).expanduser().resolve()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not src.is_dir():
        raise FormatError(f"{src}: not a directory (a Hugging Face model directory is expected)")
    cfg = _read_json(src / CONFIG)
    arch, p = params_from_config(cfg, _read_json(src / GENERATION_CONFIG, required=False), src / CONFIG)
    if not (src / TOKENIZER).is_file():
        raise FormatError(f"{src / TOKENIZER}: not found (GdsLLM needs a fast tokenizer file)")
    units = hf_units(src, p, arch)
    with ModelWriter(dst, p, dtype, chat_template=chat_template_of(src), source=f"hf:{src}",
                     overwrite=overwrite, architecture=arch, quant=None if quant == "none" else quant,
                     group_size=group_size, quant_device=quant_device) as w:
        for _, tensors in unit_progress(units, len(unit_layout(p)), f"convert {src.name}", progress):
            w.add_unit(tensors)
            del tensors  # one unit in memory at a time
        w.add_file(TOKENIZER, src / TOKENIZER, tokenizer=True)
        for extra in (TOKENIZER_CONFIG, GENERATION_CONFIG):
            if (src / extra).is_file():
                w.add_file(extra, src / extra)
    return w.dst
