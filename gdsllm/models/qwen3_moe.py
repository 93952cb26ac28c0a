"""Qwen3-MoE: Qwen3 attention (per-head q/k norms) and a sparse mixture of experts in every
block: softmax router, top-k, renormalised only with `norm_topk_prob`
(`gdsllm.models.moe`; the switches are parameters).

    fam = family("qwen3_moe"); r = fam.route(p, weights, x, cos, sin, batch, layer)
"""
from __future__ import annotations

from gdsllm.models.llama import lm_head
from gdsllm.models.moe import decoder_block, expert_mlp, route

__all__ = ["decoder_block", "expert_mlp", "lm_head", "route"]
