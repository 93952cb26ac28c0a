"""The LLaMA family: decoder block and final norm + LM head, one unit at a time.

Every function takes only its own unit's weights (the views `gdsllm.models.views.unit_tensors`
gives), so unit k runs with nothing but unit k resident. Activations are flattened over all tokens
of all sequences of a batch ([T, hidden]); only attention looks at sequence boundaries, through
the `PassBatch` the runner passes (gdsllm.models.attention: the paged KV cache). The numerics follow
transformers' `modeling_llama` (see `gdsllm.models.layers`).

The same block serves the families that are LLaMA with a switch, each read from the parameters:
`attention_bias` / `mlp_bias` (LLaMA checkpoints that set them, Qwen2's q/k/v biases), `qk_norm`
(Qwen3), a sliding window (Mistral, Qwen2/3 with `use_sliding_window`).

    x = decoder_block(p, weights, x, cos, sin, batch, layer)
    logits = lm_head(p, head_weights, x[last_rows])
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
    """One pre-norm decoder block over the flattened batch x [T, hidden]; appends to each KV cache."""
    h = rms_norm(x, weights["input_layernorm.weight"], p.rms_norm_eps,
                 feeds=weights.get("self_attn.q_proj.weight"))
    a = self_attention(p, weights, h, cos, sin, batch, layer, cudnn_attention)
    x, h = add_rms_norm(x, a, weights["post_attention_layernorm.weight"], p.rms_norm_eps,
                        feeds=weights.get("mlp.gate_proj.weight"))
    return x + gated_mlp(p, weights, h)
