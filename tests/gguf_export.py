"""Writes a Hugging Face model as llama.cpp's convert_hf_to_gguf.py would (F32 tensors): the
tiny GGUFs the family tests convert. llama.cpp's storage conventions are applied here on purpose
(a llama's Q/K rows permuted for its rotary layout, Gemma's norms stored as 1 + w), so the
converter has to undo them; transformers' own GGUF loader reading these files checks that they
are right.

    write_gguf(hf_model, hf_dir / "tokenizer.json", tmp / "m.gguf", name="tiny")
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma3_text": "gemma3", "mixtral": "llama", "qwen3_moe": "qwen3moe"}
# A mixture of experts: transformers 5 holds each layer's experts fused in memory
# (mlp.experts.gate_up_proj [E, 2f, h], gate rows first; mlp.experts.down_proj [E, h, f]);
# llama.cpp stores one 3-D tensor per projection (ffn_gate_exps, ffn_up_exps, ffn_down_exps).


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(model, tokenizer_json: Path, dst: Path, name: str = "tiny",
               experts_q8: bool = False) -> Path:
    """`experts_q8`: a mixture of experts' 3-D expert tensors stored as Q8_0 blocks."""
    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type]
    w = gguf.GGUFWriter(str(dst), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rp = cfg.rope_parameters
    rp = rp.get("full_attention", rp)
    w.add_rope_freq_base(rp["rope_theta"])
    if rp.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if getattr(cfg, "sliding_window", None) is not None and cfg.model_type in ("mistral", "gemma3_text"):
        w.add_sliding_window(cfg.sliding_window)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if cfg.model_type == "qwen3_moe":
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    _tokenizer(w, tokenizer_json, cfg)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    stacks: dict[str, torch.Tensor] = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf_name.endswith(".experts.gate_up_proj"):
            gate, up = t.detach().float().chunk(2, dim=1)
            stacks[hf_name.replace("gate_up_proj", "gate_proj")] = gate
            stacks[hf_name.replace("gate_up_proj", "up_proj")] = up
            continue
        if hf_name.endswith(".experts.down_proj"):
            stacks[hf_name] = t.detach().float()
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        gname = f"{names.get_name(stem)}.{suffix}"
        t = t.detach().float().clone()
        if arch == "llama" and ".attn_q." in gname:
            t = _permute(t, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gname:
            t = _permute(t, cfg.num_key_value_heads)
        elif arch == "gemma3" and gname.endswith("norm.weight"):
            t = t + 1
        w.add_tensor(gname, np.ascontiguousarray(t.numpy()))
    for stem, t in stacks.items():
        a = np.ascontiguousarray(t.numpy())
        if experts_q8:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(f"{names.get_name(stem)}.weight", gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(f"{names.get_name(stem)}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _tokenizer(w, tokenizer_json: Path, cfg) -> None:
    """The synth byte-level BPE as llama.cpp stores a "gpt2" tokenizer."""
    doc = json.loads(tokenizer_json.read_text())
    vocab = dict(doc["model"]["vocab"])
    specials = {a["content"]: a["id"] for a in doc["added_tokens"]}
    vocab.update(specials)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in doc["model"]["merges"]])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_add_bos_token(False)
