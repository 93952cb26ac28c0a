"""The LLaMA family: decoder block and final norm + LM head, one unit at a time.

Every function takes only its own unit's weights (the views `gdsllm.engine.views.unit_tensors`
gives), so unit k runs with nothing but unit k resident. Activations are flattened over all tokens
of all sequences of a batch ([T, hidden]); only attention looks at sequence boundaries, through
the `Segment`s the runner passes (one per sequence, each with its KV cache). The numerics follow
transformers' `modeling_llama` (see `gdsllm.models.layers`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import LlamaParams
from gdsllm.models.layers import Segment, apply_rope, attention, linear, rms_norm


def decoder_block(p: LlamaParams, weights: dict[str, torch.Tensor], x: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment],
                  layer: int, cudnn_attention: bool = False) -> torch.Tensor:
    """One decoder block over the flattened batch x [T, hidden]; appends to each KV cache."""
    T = x.shape[0]
    hd, nh, nkv = p.head_dim, p.num_attention_heads, p.num_key_value_heads
    h = rms_norm(x, weights["input_layernorm.weight"], p.rms_norm_eps)
    # The projections run once over all tokens of all sequences: one large matmul per weight
    # is what makes a weight pass serve a whole batch for the price of one.
    q = linear(weights, "self_attn.q_proj.weight", h).view(T, nh, hd)
    k = linear(weights, "self_attn.k_proj.weight", h).view(T, nkv, hd)
    v = linear(weights, "self_attn.v_proj.weight", h).view(T, nkv, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    outs = []
    for seg in segments:
        past = seg.cache.length
        ks, vs = seg.cache.update(layer, k[seg.start:seg.end].transpose(0, 1),
                                  v[seg.start:seg.end].transpose(0, 1))
        outs.append(attention(q[seg.start:seg.end].transpose(0, 1), ks, vs, past, cudnn_attention))
    a = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    assert a.shape == (T, nh * hd), a.shape
    x = x + linear(weights, "self_attn.o_proj.weight", a)
    h = rms_norm(x, weights["post_attention_layernorm.weight"], p.rms_norm_eps)
    gate = linear(weights, "mlp.gate_proj.weight", h)
    up = linear(weights, "mlp.up_proj.weight", h)
    return x + linear(weights, "mlp.down_proj.weight", F.silu(gate) * up)


def lm_head(p: LlamaParams, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head over the rows given ([B, hidden]); float32 logits [B, vocab]."""
    h = rms_norm(x, weights["norm.weight"], p.rms_norm_eps)
    return linear(weights, "lm_head.weight", h).float()
