"""The hyper-parameters that tell model families apart, with LLaMA defaults, so metadata written
before families existed loads unchanged. `gdsllm.format.metadata.LlamaParams` inherits them;
`gdsllm.models` implements what they mean.

    p = LlamaParams(..., qk_norm=True, layer_types=("sliding_attention", "full_attention"),
                    sliding_window=512)
    p.layer_window(0), family_block_shapes(p)     # 512, {"self_attn.q_norm.weight": (hd,), ...}
"""
from __future__ import annotations

from dataclasses import dataclass

LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the gated-MLP activations gdsllm.models implements


@dataclass(frozen=True, kw_only=True)
class FamilyParams:
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2, LLaMA attention_bias)
    attention_out_bias: bool = False  # o_proj carries a bias (LLaMA/Qwen3 attention_bias)
    mlp_bias: bool = False  # gate/up/down projections carry biases (LLaMA mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before the rotary embedding (Qwen3, Gemma 3)
    sliding_window: int | None = None  # keys a sliding-window layer sees (the query's own included)
    layer_types: tuple[str, ...] = ()  # per layer, one of LAYER_TYPES; () = all full attention
    rope_local_theta: float | None = None  # rope base of sliding layers (Gemma 3); None: rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None: head_dim's
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    norm_weight_offset: float = 0.0  # RMSNorms multiply by (offset + weight) (Gemma: 1)
    feedforward_norms: bool = False  # Gemma's sandwich: attention output, pre- and post-FFN norms
    hidden_act: str = "silu"  # gated-MLP activation, one of ACTIVATIONS
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    attn_logit_softcapping: float | None = None  # recorded only: Gemma 3 (transformers) ignores it
    # Mixtures of experts (Mixtral, Qwen3-MoE): 0 experts = a dense MLP in every block. Each expert
    # is its own unit ("block.i.expert.j", gdsllm.format.moe); the block keeps the router.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # the router's top-k
    moe_intermediate_size: int = 0  # each expert's FFN width
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1 (Mixtral: always)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder block `layer`, or None for full attention."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def layer_rope(self, layer: int) -> str:
        """Which rotary table block `layer` uses: "local" (sliding layers with their own base) or
        "global"."""
        local = self.rope_local_theta is not None and self.layer_window(layer) is not None
        return "local" if local else "global"


def _opt(v, kind):
    return None if v is None else kind(v)


def family_fields(cfg: dict) -> dict:
    """The family fields of a metadata `config` object (absent ones: LLaMA defaults)."""
    return dict(
        attention_bias=bool(cfg.get("attention_bias", False)),
        attention_out_bias=bool(cfg.get("attention_out_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=bool(cfg.get("qk_norm", False)),
        sliding_window=_opt(cfg.get("sliding_window"), int),
        layer_types=tuple(str(t) for t in cfg.get("layer_types") or ()),
        rope_local_theta=_opt(cfg.get("rope_local_theta"), float),
        query_pre_attn_scalar=_opt(cfg.get("query_pre_attn_scalar"), float),
        embed_scale=float(cfg.get("embed_scale", 1.0)),
        norm_weight_offset=float(cfg.get("norm_weight_offset", 0.0)),
        feedforward_norms=bool(cfg.get("feedforward_norms", False)),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        final_logit_softcapping=_opt(cfg.get("final_logit_softcapping"), float),
        attn_logit_softcapping=_opt(cfg.get("attn_logit_softcapping"), float),
        num_experts=int(cfg.get("num_experts", 0)),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0)),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))


def family_problem(p) -> str | None:
    """What is inconsistent or unimplemented in `p` (a LlamaParams), naming the field; or None."""
    if p.num_attention_heads % p.num_key_value_heads:
        return "num_attention_heads must be a multiple of num_key_value_heads"
    if p.hidden_act not in ACTIVATIONS:
        return f"hidden_act {p.hidden_act!r} is not supported (GdsLLM implements {', '.join(ACTIVATIONS)})"
    if p.layer_types and len(p.layer_types) != p.num_hidden_layers:
        return f"layer_types has {len(p.layer_types)} entries for {p.num_hidden_layers} layers"
    bad = sorted(set(p.layer_types) - set(LAYER_TYPES))
    if bad:
        return f"layer_types {bad} are not supported (GdsLLM implements {', '.join(LAYER_TYPES)})"
    if "sliding_attention" in p.layer_types and not (p.sliding_window or 0) > 0:
        return f"sliding layers need a positive sliding_window, got {p.sliding_window!r}"
    if p.num_experts < 0 or (p.num_experts and not 1 <= p.num_experts_per_tok <= p.num_experts):
        return (f"num_experts_per_tok {p.num_experts_per_tok} must be between 1 and num_experts "
                f"{p.num_experts}")
    if p.num_experts and p.moe_intermediate_size <= 0:
        return f"moe_intermediate_size must be positive, got {p.moe_intermediate_size}"
    return None


def family_block_shapes(p) -> dict[str, tuple[int, ...]]:
    """The tensors a decoder block holds beyond LLaMA's nine, with their shapes."""
    h, hd, ffn = p.hidden_size, p.head_dim, p.intermediate_size
    qd, kvd = p.num_attention_heads * hd, p.num_key_value_heads * hd
    out: dict[str, tuple[int, ...]] = {}
    if p.attention_bias:
        out.update({"self_attn.q_proj.bias": (qd,), "self_attn.k_proj.bias": (kvd,),
                    "self_attn.v_proj.bias": (kvd,)})
    if p.attention_out_bias:
        out["self_attn.o_proj.bias"] = (h,)
    if p.num_experts:  # the router; the experts are units of their own
        out["mlp.gate.weight"] = (p.num_experts, h)
    if p.mlp_bias and not p.num_experts:
        out.update({"mlp.gate_proj.bias": (ffn,), "mlp.up_proj.bias": (ffn,), "mlp.down_proj.bias": (h,)})
    if p.qk_norm:
        out.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    if p.feedforward_norms:
        out.update({"pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)})
    return out


EXPERT_TENSORS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")  # HF: w1, w3, w2


def expert_shapes(p) -> dict[str, tuple[int, ...]]:
    """The tensors of one expert unit (`block.i.expert.j`), a gated MLP of moe_intermediate_size."""
    h, f = p.hidden_size, p.moe_intermediate_size
    return {"gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f)}


def expert_unit_name(layer: int, expert: int) -> str:
    return f"block.{layer}.expert.{expert}"


def expert_index(name: str) -> int | None:
    """j of a unit named "block.i.expert.j"; None for any other unit."""
    parts = name.split(".")
    return int(parts[3]) if len(parts) == 4 and parts[2] == "expert" else None
