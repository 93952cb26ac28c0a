"""Qwen2 / Qwen2.5: LLaMA's block with biases on the q, k and v projections (`attention_bias`;
o_proj has none) and, where `use_sliding_window` is set, sliding-window layers from
`max_window_layers` on. The block is `gdsllm.models.llama`'s: the switches are parameters.

    fam = family("qwen2"); x = fam.decoder_block(p, weights, x, cos, sin, batch, layer)
"""
from __future__ import annotations

from gdsllm.models.llama import decoder_block, lm_head

__all__ = ["decoder_block", "lm_head"]
