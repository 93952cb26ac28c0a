"""Qwen3: LLaMA's block with a per-head RMSNorm on q and on k before the rotary embedding
(`qk_norm`, weights `self_attn.q_norm` / `k_norm` of head_dim), biases on all four attention
projections when `attention_bias` is set, and optional sliding-window layers as Qwen2. The block
is `gdsllm.models.llama`'s: the switches are parameters.

    fam = family("qwen3"); x = fam.decoder_block(p, weights, x, cos, sin, batch, layer)
"""
from __future__ import annotations

from gdsllm.models.llama import decoder_block, lm_head

__all__ = ["decoder_block", "lm_head"]
