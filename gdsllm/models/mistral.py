"""Mistral: LLaMA's block; when the config sets `sliding_window`, every layer attends to that
many positions only (and its KV cache keeps only those). The block is `gdsllm.models.llama`'s:
the window is a parameter.

    fam = family("mistral"); x = fam.decoder_block(p, weights, x, cos, sin, batch, layer)
"""
from __future__ import annotations

from gdsllm.models.llama import decoder_block, lm_head

__all__ = ["decoder_block", "lm_head"]
