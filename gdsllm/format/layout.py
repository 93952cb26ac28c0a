"""Which units a model has and which tensors each must hold, from its parameters alone.

    unit_layout(p)               # [("embed", "embed", None), ("block.0", "block", 0), ..., ("head", "head", None)]
    unit_tensor_shapes(p, "block")   # {"self_attn.q_proj.weight": (heads * head_dim, hidden), ...}

The converters write this layout, `gdsllm.format.metadata` checks a directory against it, and the
runner walks it; a MoE block is followed by its experts, each a unit of its own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from gdsllm.format.family_params import expert_shapes, expert_unit_name, family_block_shapes

if TYPE_CHECKING:
    from gdsllm.format.metadata import LlamaParams


def unit_tensor_shapes(p: LlamaParams, kind: str, tied_copy: bool = False) -> dict[str, tuple[int, ...]]:
    """The tensors every unit of `kind` must hold, with their shapes (Hugging Face layout). A tied
    head has no lm_head.weight (the embedding is stored once) unless `tied_copy` (older directories)."""
    h, hd = p.hidden_size, p.head_dim
    if kind == "embed":
        return {"embed_tokens.weight": (p.vocab_size, h)}
    if kind == "head":
        tied = p.tie_word_embeddings and not tied_copy
        return {"norm.weight": (h,)} | ({} if tied else {"lm_head.weight": (p.vocab_size, h)})
    if kind == "expert":
        return expert_shapes(p)
    assert kind == "block", kind
    dense = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (p.num_attention_heads * hd, h),
        "self_attn.k_proj.weight": (p.num_key_value_heads * hd, h),
        "self_attn.v_proj.weight": (p.num_key_value_heads * hd, h),
        "self_attn.o_proj.weight": (h, p.num_attention_heads * hd),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (p.intermediate_size, h),
        "mlp.up_proj.weight": (p.intermediate_size, h),
        "mlp.down_proj.weight": (h, p.intermediate_size),
    }
    if p.num_experts:  # a MoE block holds the router instead (family_block_shapes)
        dense = {k: v for k, v in dense.items() if not k.startswith("mlp.")}
    return dense | family_block_shapes(p)  # biases, q/k norms, feed-forward norms, router


def unit_layout(p: LlamaParams) -> list[tuple[str, str, int | None]]:
    """(name, kind, layer) of every unit in file order: embedding, blocks (each followed by its
    experts in a MoE model), head."""
    units: list[tuple[str, str, int | None]] = [("embed", "embed", None)]
    for i in range(p.num_hidden_layers):
        units.append((f"block.{i}", "block", i))
        units += [(expert_unit_name(i, j), "expert", i) for j in range(p.num_experts)]
    units.append(("head", "head", None))
    return units
