"""Tiny random Hugging Face models of every family, built with transformers' own config classes,
saved with `save_pretrained` (and a synth tokenizer), converted with `convert_hf`.

    hf, hf_dir, model_dir = family_model(tmp, "gemma3")     # float32 CPU reference + our model

Weights are re-drawn with a fixed seed and a larger spread than transformers' init (std 0.02
gives nearly flat logits, so greedy picks would hinge on near-ties): norms near their neutral
value ((1 + w) for Gemma), biases non-zero, so every family feature changes the numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen3Config)

from gdsllm.convert.hf import convert_hf
from gdsllm.convert.synth_tokenizer import synth_tokenizer_json, tokenizer_config

_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = 8  # sliding window of the windowed cases: shorter than prompt + 32 new tokens

# case -> (config class, overrides, architecture GdsLLM records)
CASES = {
    "llama_bias": (LlamaConfig, dict(attention_bias=True, mlp_bias=True), "llama"),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True), "qwen2"),
    "qwen2_sliding": (Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW,
                                        max_window_layers=1), "qwen2"),
    "qwen3": (Qwen3Config, dict(attention_bias=True), "qwen3"),
    "mistral": (MistralConfig, dict(sliding_window=WINDOW), "mistral"),
    "gemma3": (Gemma3TextConfig, dict(sliding_window=WINDOW, sliding_window_pattern=2,
                                      query_pre_attn_scalar=24, final_logit_softcapping=8.0,
                                      rope_parameters={
                                          "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 100000.0},
                                          "sliding_attention": {"rope_type": "default",
                                                                "rope_theta": 10000.0}}),
               "gemma3"),
}


def hf_config(case: str, **extra):
    cls, over, _ = CASES[case]
    return cls(**{**_BASE, **over, **extra})


@torch.no_grad()
def randomize(model, seed: int, gemma: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, t in sorted(model.named_parameters()):
        noise = torch.randn(t.shape, generator=g)
        if name.endswith("norm.weight"):
            t.copy_(noise * 0.1 + (0.0 if gemma else 1.0))
        elif name.endswith("bias"):
            t.copy_(noise * 0.1)
        else:
            t.copy_(noise * 0.08)


def save_hf(config, dst: Path, seed: int = 0):
    """A random model of `config` saved as a Hugging Face directory; returns it (float32, eval)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed, gemma=config.model_type.startswith("gemma"))
    model.save_pretrained(dst)
    (dst / "tokenizer.json").write_bytes(synth_tokenizer_json(config.vocab_size))
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config()))
    return model


def family_model(tmp: Path, case: str, dtype: str = "float32", seed: int = 0):
    """(transformers model float32, HF directory, converted GdsLLM directory) for `case`."""
    hf_dir = tmp / f"{case}-hf"
    hf = save_hf(hf_config(case), hf_dir, seed)
    d = convert_hf(hf_dir, tmp / f"{case}-{dtype}", dtype=dtype)
    return hf, hf_dir, d
