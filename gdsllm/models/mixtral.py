"""Mixtral: LLaMA/Mistral attention (optional sliding window) and a sparse mixture of experts in
place of the MLP: softmax router over `num_experts`, top-`num_experts_per_tok`, always
renormalised. The block unit runs `route`; the routed experts' units run after it
(`gdsllm.models.moe`).

    fam = family("mixtral"); r = fam.route(p, weights, x, cos, sin, batch, layer)
"""
from __future__ import annotations

from gdsllm.models.llama import lm_head
from gdsllm.models.moe import decoder_block, expert_mlp, route

__all__ = ["decoder_block", "expert_mlp", "lm_head", "route"]
