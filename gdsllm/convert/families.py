"""What each model family's checkpoints say, in Hugging Face configs and in GGUF files: the
architecture names, the family parameters (`gdsllm.format.family_params`) and the tensor names.

    arch, fields = hf_family("config.json", cfg)      # "qwen3", {"qk_norm": True, ...}
    gguf_block_name("gemma3", "pre_feedforward_layernorm.weight", 3)  # "blk.3.ffn_norm.weight"

A config feature GdsLLM does not implement (bidirectional attention, a rope type of the sliding
layers, an activation) is refused here, with the field named, before anything is written.
"""
from __future__ import annotations

import functools
import math

from gdsllm.format.family_params import ACTIVATIONS
from gdsllm.format.metadata import FormatError

# Hugging Face class -> (model_type, GdsLLM architecture)
HF_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "MistralForCausalLM": ("mistral", "mistral"),
    "Gemma3ForCausalLM": ("gemma3_text", "gemma3"),
    "MixtralForCausalLM": ("mixtral", "mixtral"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "qwen3_moe"),
}
# The defaults of each transformers config class for the keys read here (a config.json may omit them).
HF_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0),
    "qwen2": dict(max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=10000.0,
                  sliding_window=4096, max_window_layers=28),
    "qwen3": dict(max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=10000.0,
                  sliding_window=4096, max_window_layers=28, head_dim=128),
    "mistral": dict(max_position_embeddings=131072, tie_word_embeddings=False, rope_theta=10000.0,
                    sliding_window=4096),
    "gemma3": dict(max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=1e6,
                   rope_local_base_freq=10000.0, sliding_window=4096, head_dim=256,
                   query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh", vocab_size=262208),
    "mixtral": dict(max_position_embeddings=131072, tie_word_embeddings=False, rope_theta=1e6,
                    sliding_window=None, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=10000.0,
                      sliding_window=4096, num_local_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768),
}
SUPPORTED_HF = ", ".join(HF_ARCHITECTURES)


def hf_architecture(cfg: dict, where) -> str:
    """The GdsLLM architecture of a Hugging Face config, or FormatError listing the supported ones."""
    archs = cfg.get("architectures") or []
    mtype = cfg.get("model_type")
    for a in archs:
        if a in HF_ARCHITECTURES and HF_ARCHITECTURES[a][0] == mtype:
            return HF_ARCHITECTURES[a][1]
    if not archs:  # no class named: the model_type decides
        for cls, (mt, arch) in HF_ARCHITECTURES.items():
            if mt == mtype:
                return arch
    raise FormatError(f"{where}: unsupported architecture {archs} (model_type {mtype!r}); GdsLLM "
                      f"converts {SUPPORTED_HF}")


def _sliding_layers(arch: str, cfg: dict, n: int, where) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers derives them for `arch`."""
    d = HF_DEFAULTS[arch]
    if arch in ("qwen2", "qwen3"):
        window = cfg.get("sliding_window", d["sliding_window"]) if cfg.get("use_sliding_window") else None
        if window is None:
            return None, ()
        types = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", d["max_window_layers"])
            else "full_attention" for i in range(n)]
        return int(window), tuple(types)
    if arch == "qwen3_moe":  # transformers: the window applies to every layer, or to none
        window = cfg.get("sliding_window", d["sliding_window"]) if cfg.get("use_sliding_window") else None
        return (None, ()) if window is None else (int(window), ("sliding_attention",) * n)
    if arch in ("mistral", "mixtral"):
        window = cfg.get("sliding_window", d["sliding_window"])
        return (None, ()) if window is None else (int(window), ("sliding_attention",) * n)
    if arch == "gemma3":
        if cfg.get("use_bidirectional_attention"):
            raise FormatError(f"{where}: use_bidirectional_attention=true is not supported "
                              f"(GdsLLM runs causal decoders)")
        pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
        types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        return int(cfg.get("sliding_window", d["sliding_window"])), tuple(types)
    if cfg.get("layer_types") and "sliding_attention" in cfg["layer_types"]:
        raise FormatError(f"{where}: layer_types with sliding_attention are not supported for {arch}")
    return None, ()


def gemma3_rope(cfg: dict, where) -> tuple[float, dict | None, float]:
    """(global theta, global scaling or None, local theta) of a Gemma 3 config (transformers 5's
    per-layer-type `rope_parameters`, or the older rope_theta / rope_scaling / rope_local_base_freq)."""
    d = HF_DEFAULTS["gemma3"]
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:
        glob, loc = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
    else:
        glob = dict(cfg.get("rope_scaling") or {})
        glob["rope_theta"] = cfg.get("rope_theta", d["rope_theta"])
        loc = {"rope_theta": cfg.get("rope_local_base_freq", d["rope_local_base_freq"])}
    if loc.get("rope_type", loc.get("type", "default")) != "default":
        raise FormatError(f"{where}: rope_parameters.sliding_attention rope_type "
                          f"{loc.get('rope_type', loc.get('type'))!r} is not supported (only 'default')")
    theta = float(glob.pop("rope_theta", d["rope_theta"]))
    if "type" in glob and "rope_type" not in glob:
        glob["rope_type"] = glob.pop("type")
    scaling = glob if glob.get("rope_type", "default") != "default" else None
    return theta, scaling, float(loc.get("rope_theta", d["rope_local_base_freq"]))


def hf_family(arch: str, cfg: dict, where) -> dict:
    """The family fields (and per-family defaults of the LLaMA fields) of a Hugging Face config."""
    n = int(cfg["num_hidden_layers"])
    act_key = "hidden_activation" if arch == "gemma3" else "hidden_act"
    act = cfg.get(act_key) or HF_DEFAULTS[arch].get("hidden_activation", "silu")
    if act not in ACTIVATIONS:
        raise FormatError(f"{where}: {act_key} {act!r} is not supported (GdsLLM implements "
                          f"{', '.join(ACTIVATIONS)})")
    window, types = _sliding_layers(arch, cfg, n, where)
    out = dict(hidden_act=act, sliding_window=window, layer_types=types)
    bias = bool(cfg.get("attention_bias", False))
    if arch == "llama":
        out.update(attention_bias=bias, attention_out_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))
    elif arch == "qwen2":
        out.update(attention_bias=True)  # Qwen2Attention: q/k/v biased, o_proj not
    elif arch == "qwen3":
        out.update(attention_bias=bias, attention_out_bias=bias, qk_norm=True)
    elif arch in ("mixtral", "qwen3_moe"):
        out.update(moe_family(arch, cfg, where))
    elif arch == "gemma3":
        out.update(attention_bias=bias, attention_out_bias=bias, qk_norm=True, feedforward_norms=True,
                   norm_weight_offset=1.0, embed_scale=float(cfg["hidden_size"]) ** 0.5,
                   query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar",
                                                       HF_DEFAULTS["gemma3"]["query_pre_attn_scalar"])),
                   final_logit_softcapping=cfg.get("final_logit_softcapping"),
                   attn_logit_softcapping=cfg.get("attn_logit_softcapping"))
    return out


def moe_family(arch: str, cfg: dict, where) -> dict:
    """The mixture-of-experts fields of a Mixtral or Qwen3-MoE config (Qwen3-MoE's dense layers,
    `mlp_only_layers` / `decoder_sparse_step`, are refused by name)."""
    d = HF_DEFAULTS[arch]
    n_exp = cfg.get("num_experts") or cfg.get("num_local_experts") or d["num_local_experts"]
    out = dict(num_experts=int(n_exp), num_experts_per_tok=int(cfg.get("num_experts_per_tok",
                                                                        d["num_experts_per_tok"])))
    if arch == "mixtral":  # MixtralTopKRouter always renormalises; the experts are full width
        return out | dict(norm_topk_prob=True, moe_intermediate_size=int(cfg["intermediate_size"]))
    if cfg.get("mlp_only_layers"):
        raise FormatError(f"{where}: mlp_only_layers {cfg['mlp_only_layers']} is not supported "
                          f"(GdsLLM runs Qwen3-MoE with experts in every layer)")
    if int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise FormatError(f"{where}: decoder_sparse_step {cfg['decoder_sparse_step']} is not "
                          f"supported (GdsLLM runs Qwen3-MoE with experts in every layer)")
    bias = bool(cfg.get("attention_bias", False))
    return out | dict(qk_norm=True, attention_bias=bias, attention_out_bias=bias,
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                      moe_intermediate_size=int(cfg.get("moe_intermediate_size",
                                                        d["moe_intermediate_size"])))


# HF tensor names of an expert's weights, and of the router, per MoE architecture
HF_EXPERT = {"mixtral": ("block_sparse_moe", {"gate_proj.weight": "w1.weight", "up_proj.weight":
                                              "w3.weight", "down_proj.weight": "w2.weight"}),
             "qwen3_moe": ("mlp", {})}


def hf_tensor_key(arch: str, kind: str, layer: int | None, expert: int | None, name: str) -> str:
    """The Hugging Face name of GdsLLM tensor `name` of a unit: "model.layers.{i}.{name}" for a
    block, the router and experts under each MoE family's own module names."""
    if kind == "expert":
        mod, names = HF_EXPERT[arch]
        return f"model.layers.{layer}.{mod}.experts.{expert}.{names.get(name, name)}"
    if kind == "block":
        if name == "mlp.gate.weight" and arch in HF_EXPERT:
            name = f"{HF_EXPERT[arch][0]}.gate.weight"
        return f"model.layers.{layer}.{name}"
    return name if name == "lm_head.weight" else f"model.{name}"


# ---- GGUF --------------------------------------------------------------------------------------

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "qwen3moe")  # general.architecture values


@functools.lru_cache(maxsize=None)
def _name_map(gguf_arch: str, n_blocks: int):
    import gguf
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    return gguf.get_tensor_name_map(arch, n_blocks)


def gguf_tensor_name(gguf_arch: str, n_blocks: int, hf_name: str) -> str:
    """The GGUF name of a Hugging Face tensor name ("model.layers.3.mlp.up_proj.weight" ->
    "blk.3.ffn_up.weight"), through gguf-py's own table (the one transformers' loader uses)."""
    stem, suffix = hf_name.rsplit(".", 1)
    g = _name_map(gguf_arch, n_blocks).get_name(stem)
    if g is None:
        raise FormatError(f"no GGUF tensor name for {hf_name} in architecture {gguf_arch}")
    return f"{g}.{suffix}"


def gguf_family(gguf_arch: str, field, p_hidden: int, heads: int, n_layers: int, head_dim: int,
                names: set[str], general_name: str) -> tuple[str, dict]:
    """(GdsLLM architecture, family fields) of a GGUF; `field(key, default)` reads "{arch}.key"."""
    if gguf_arch == "llama" and field("expert_count", 0):  # llama.cpp writes Mixtral as llama
        return "mixtral", gguf_moe(field, norm=True)
    if gguf_arch == "qwen3moe":  # llama.cpp renormalises Qwen3-MoE's top-k (norm_w = true)
        bias = "blk.0.attn_q.bias" in names
        return "qwen3_moe", dict(qk_norm=True, attention_bias=bias, attention_out_bias=bias,
                                 **gguf_moe(field, norm=bool(field("expert_weights_norm", True))))
    if gguf_arch == "llama":
        window = field("attention.sliding_window", None)
        arch = "mistral" if "mistral" in general_name.lower() else "llama"
        out = dict(attention_bias="blk.0.attn_q.bias" in names,
                   attention_out_bias="blk.0.attn_output.bias" in names,
                   mlp_bias="blk.0.ffn_up.bias" in names)
        if window:
            out.update(sliding_window=int(window), layer_types=("sliding_attention",) * n_layers)
            arch = "mistral"
        return arch, out
    if gguf_arch == "qwen2":
        return "qwen2", dict(attention_bias=True)
    if gguf_arch == "qwen3":
        bias = "blk.0.attn_q.bias" in names
        return "qwen3", dict(qk_norm=True, attention_bias=bias, attention_out_bias=bias)
    assert gguf_arch == "gemma3", gguf_arch
    # llama.cpp (src/llama-model.cpp): every 6th layer global, local rope base 10000, attention
    # scale 1/sqrt(head_dim) except the 27B (62 layers), which uses hidden / heads; newer files
    # may state the pattern (an int, or one bool per layer: true = sliding) and the local base.
    pattern = field("attention.sliding_window_pattern", 6)
    if isinstance(pattern, (list, tuple)):
        types = tuple("sliding_attention" if s else "full_attention" for s in pattern)
    else:
        types = tuple("sliding_attention" if (i + 1) % int(pattern) else "full_attention"
                      for i in range(n_layers))
    scalar = p_hidden / heads if n_layers == 62 else head_dim
    return "gemma3", dict(
        qk_norm=True, feedforward_norms=True, norm_weight_offset=1.0, embed_scale=math.sqrt(p_hidden),
        hidden_act="gelu_pytorch_tanh", sliding_window=int(field("attention.sliding_window", 4096)),
        layer_types=types, rope_local_theta=float(field("rope.freq_base_swa", 10000.0)), query_pre_attn_scalar=float(scalar),
        final_logit_softcapping=field("final_logit_softcapping", None),
        attn_logit_softcapping=field("attn_logit_softcapping", None))


def gguf_moe(field, norm: bool) -> dict:
    """The mixture-of-experts fields of a GGUF (`{arch}.expert_count`, `expert_used_count`,
    `expert_feed_forward_length`, which defaults to `feed_forward_length` as in Mixtral)."""
    return dict(num_experts=int(field("expert_count", 0)),
                num_experts_per_tok=int(field("expert_used_count", 0)),
                moe_intermediate_size=int(field("expert_feed_forward_length", None)
                                          or field("feed_forward_length", 0)),
                norm_topk_prob=norm)


def gguf_expert_stem(name: str) -> str:
    """The HF-style stem gguf-py maps to an expert tensor ("gate_proj.weight" -> "mlp.experts.gate_proj",
    GGUF "blk.{i}.ffn_gate_exps": all of a layer's experts in one 3-D tensor)."""
    return "mlp.experts." + name.removesuffix(".weight")
