"""Gemma 3 (text): the decoder block as transformers' `Gemma3DecoderLayer`.

Differences from LLaMA, all carried by the parameters the converters record:
- RMSNorms multiply by (1 + weight) in float32 (`norm_weight_offset=1`), q/k included;
- per-head q/k RMSNorm before the rotary embedding (`qk_norm`);
- a sandwich of norms (`feedforward_norms`): the attention output is normed before the residual
  add, and the MLP has a norm before and one after it;
- GeGLU with tanh GELU (`hidden_act="gelu_pytorch_tanh"`);
- attention scale `query_pre_attn_scalar ** -0.5`;
- sliding-window local layers with their own rope base (`rope_local_theta`) and global layers
  (`layer_types`); the runner hands each layer its rotary table;
- embeddings scaled by sqrt(hidden) (`embed_scale`, in the runner's embed), and the final logit
  soft-cap where configured (`gdsllm.models.layers.lm_head`).

    fam = family("gemma3"); x = fam.decoder_block(p, weights, x, cos, sin, batch, layer)
"""
from __future__ import annotations

import torch

from gdsllm.format.metadata import LlamaParams
from gdsllm.models.attention import PassBatch
from gdsllm.models.layers import add_rms_norm, gated_mlp, lm_head, rms_norm, self_attention

__all__ = ["decoder_block", "lm_head"]


def decoder_block(p: LlamaParams, weights: dict[str, torch.Tensor], x: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, batch: PassBatch,
                  layer: int, cudnn_attention: bool = False) -> torch.Tensor:
    """One Gemma 3 block over the flattened batch x [T, hidden]; appends to each KV cache."""
    eps, off = p.rms_norm_eps, p.norm_weight_offset
    h = rms_norm(x, weights["input_layernorm.weight"], eps, off,
                 feeds=weights.get("self_attn.q_proj.weight"))
    a = self_attention(p, weights, h, cos, sin, batch, layer, cudnn_attention)
    a = rms_norm(a, weights["post_attention_layernorm.weight"], eps, off)
    x, h = add_rms_norm(x, a, weights["pre_feedforward_layernorm.weight"], eps, off,
                        feeds=weights.get("mlp.gate_proj.weight"))
    return x + rms_norm(gated_mlp(p, weights, h), weights["post_feedforward_layernorm.weight"], eps, off)
