"""Pieces every model family shares, written once: rotary embeddings, RMSNorm, the embedding
gather, the attention call over each sequence's KV cache (full or sliding window), the
self-attention sub-block, the gated MLP, the final norm + LM head, and `linear`, the one place
where a stored weight meets a matmul (a quantized weight plugs in there). What differs between
families is read from the parameters (`gdsllm.format.family_params`), never from the family name.

Every function takes only its own unit's weights (the views `gdsllm.models.views.unit_tensors` gives),
so unit k runs with nothing but unit k resident. Activations are flattened over all tokens of all
sequences of a batch ([T, hidden]); only attention looks at sequence boundaries, through the
`PassBatch` the runner builds once per pass (gdsllm.models.attention: the paged KV cache).

The numerics follow Hugging Face transformers' `modeling_llama` exactly where it matters for
bit-closeness: RMSNorm in float32 and cast back before the weight multiply, rotary cos/sin built in
float32 and cast to the activation dtype, Llama-3 frequency scaling as `_compute_llama3_parameters`.

The torch code here is the reference and the CPU path. On CUDA the elementwise pieces (RMSNorm,
the residual add fused with the norm after it, the rotary embedding of q and k, act(gate) * up)
run as one Triton kernel each (`gdsllm.models.fused`, same rounding steps), where
`fused.usable(...)` says so.

    x = embed(w_embed, ids, dtype)
    cos, sin = rope_cos_sin(rope_inv_freq(p).to(device), positions, dtype)
    q = linear(weights, "self_attn.q_proj.weight", h)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import LlamaParams
from gdsllm.models import fused
from gdsllm.models.attention import PassBatch, attend
from gdsllm.quant.schemes import QuantWeight


ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(p: LlamaParams, kind: str = "global") -> torch.Tensor:
    """Inverse rotary frequencies (float32, [head_dim // 2], on the CPU as transformers computes
    them, so they are bit-identical there; move them), with linear or Llama-3 scaling if
    configured. `kind="local"`: the sliding layers' own base (`rope_local_theta`), unscaled."""
    dim = p.head_dim
    theta = p.rope_local_theta if kind == "local" else p.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(
        dtype=torch.float) / dim))
    rs = (p.rope_scaling if kind == "global" else None) or {}
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (GdsLLM implements "
                         f"{', '.join(ROPE_TYPES)})")
    if rope_type == "linear":
        return inv_freq / float(rs["factor"])
    try:
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
    except KeyError as e:
        raise ValueError(f"rope_scaling 'llama3' needs {e.args[0]!r}: got {rs}") from None
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, head_dim] for integer `positions` [T]; float32 math, cast to dtype."""
    freqs = positions[:, None].float() * inv_freq[None, :].float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def rope_flip_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] as [T, 1, 2, head_dim / 2], sin's first half negated: what
    apply_rope_flip multiplies by (made once per pass: PassBatch.memo)."""
    T, half = cos.shape[0], cos.shape[-1] // 2
    signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos.view(T, 1, 2, half), signed.view(T, 1, 2, half)


def apply_rope_flip(x: torch.Tensor, cos4: torch.Tensor, sin4: torch.Tensor) -> torch.Tensor:
    """apply_rope(x, cos, sin) for x [T, heads, head_dim] over rope_flip_factors(cos, sin), the
    same bits: the halves swapped by one flip and the sign carried by sin (-a * b and a * -b are
    the same float), 3 operations fewer than rotate_half's slices, neg and cat. The CPU's decode
    (one sequence, SmolLM2's 12 q+k heads of 64): 8.6 against 16.2 us a call (best of 5 x 3,000,
    2 threads, 2026-12-04 19:37 UTC, load average 0.5)."""
    T, H, hd = x.shape
    x4 = x.view(T, H, 2, hd // 2)
    return (x4 * cos4 + x4.flip(2) * sin4).view(T, H, hd)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope on q [T, nh, hd] and on k [T, nkv, hd]: one kernel on CUDA."""
    if fused.usable(q, k, cos, sin):
        return fused.rope_qk(q, k, cos, sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _plane_index(feeds, x: torch.Tensor) -> torch.Tensor | None:
    """Where the output of a fused kernel reading x (its shape) goes next into a quantized matmul
    that reads its input in another column order: that order (kernels_cuda.plane_index)."""
    if not isinstance(feeds, QuantWeight):
        return None
    from gdsllm.quant import kernels_cuda
    return kernels_cuda.plane_index(feeds, x)


def _remember(out: torch.Tensor, feeds, outp: torch.Tensor) -> torch.Tensor:
    from gdsllm.quant import kernels_cuda
    kernels_cuda.remember_planes(out, feeds, outp)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             feeds: QuantWeight | torch.Tensor | None = None) -> torch.Tensor:
    """As transformers' LlamaRMSNorm: float32 statistics, cast back, then times the weight.
    With `offset` (Gemma), as Gemma3RMSNorm: times (offset + weight) in float32, then cast back.
    One kernel on CUDA (gdsllm.models.fused). `feeds`: the weight the first matmul of the output
    has; where it is quantized and reads x in plane order, the same kernel writes that copy too
    (one launch less per matmul input: a graph node in decode, a host launch in prefill)."""
    if fused.usable(x):
        index = _plane_index(feeds, x)
        if index is None:
            return fused.rms_norm(x, weight, eps, offset)
        out, outp = fused.rms_norm_planes(x, weight, eps, offset, index)
        return _remember(out, feeds, outp)
    in_dtype = x.dtype
    if in_dtype == torch.float32 == weight.dtype and not offset:
        # the CPU's: the same ops without the no-op casts, 0.54-0.58 against 0.64-0.69 ms for a
        # token's 60 norms (benchmarks/bench_cpu_ops.py, best of 20, 2026-12-04, load 2.8-4.4)
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (offset + weight.float())).to(in_dtype)
    return weight.to(in_dtype) * h.to(in_dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0, feeds: QuantWeight | torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, rms_norm(x + y, ...)): a residual add and the norm that reads it, one kernel on
    CUDA (`feeds` as rms_norm's)."""
    if fused.usable(x, y):
        index = _plane_index(feeds, x)
        if index is None:
            return fused.add_rms_norm(x, y, weight, eps, offset)
        s, out, outp = fused.add_rms_norm_planes(x, y, weight, eps, offset, index)
        return s, _remember(out, feeds, outp)
    s = x + y
    return s, rms_norm(s, weight, eps, offset)


def linear(weights: dict[str, torch.Tensor | QuantWeight], name: str, x: torch.Tensor) -> torch.Tensor:
    """x @ weights[name].T (+ its bias, "<stem>.bias", where the unit has one), in x's dtype. On
    the CPU backend weights stored as fp16/bf16 are upcast here, once per unit and pass; on CUDA
    the compute dtype is the stored dtype (a no-op view), or bfloat16 beside float16 tensors in
    an int4 model, where x is cast instead of the weight. A quantized weight goes to its
    backend's kernel (gdsllm.quant.kernels_*)."""
    w = weights[name]
    bias = weights.get(name[: -len("weight")] + "bias")
    if isinstance(w, QuantWeight):
        y = w.linear(x)
        return y if bias is None else y + bias.to(x.dtype)
    if w.dtype != x.dtype and x.is_cuda and w.element_size() == 2 == x.element_size():
        # a float16 tensor of a model computing in bfloat16 (int4 weights, engine.runner's
        # compute_dtype): cast the activations and the result, never a copy of the weight
        y = F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
        return y.to(x.dtype)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


# Projections of one input that a backend may hold as one weight (the CPU's resident int4:
# gdsllm.quant.kernels_cpu.FusedInt4, made by gdsllm.engine.host_copies): the fused entry's name
# -> its parts, in the order of its output columns. The parts stay in the dict.
FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                       "self_attn.v_proj.weight"),
         "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def fused_linear(weights: dict, fused: str, x: torch.Tensor) -> torch.Tensor | None:
    """Where `weights` holds the parts of FUSED[fused] as one weight under that name: x times
    it, [T, sum of the parts' rows], each part's bias added to its columns. Otherwise None."""
    w = weights.get(fused)
    if w is None:
        return None
    y = w.linear(x)
    start = 0
    for name, size in zip(FUSED[fused], w.sizes):
        bias = weights.get(name[: -len("weight")] + "bias")
        if bias is not None:
            y[..., start:start + size] += bias.to(y.dtype)
        start += size
    return y


def linears(weights: dict, fused: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """linear(weights, name, x) for each part of FUSED[fused], in one matmul where `weights`
    holds them fused (fused_linear; the outputs are then views of its result), or where the
    parts are quantized weights their backend multiplies together (QuantWeight.linears: the
    dequantized path on CUDA)."""
    y = fused_linear(weights, fused, x)
    if y is not None:
        return y.split(weights[fused].sizes, dim=-1)
    parts = tuple(weights[n] for n in FUSED[fused])
    if not all(isinstance(w, QuantWeight) for w in parts):
        return tuple(linear(weights, n, x) for n in FUSED[fused])
    ys = QuantWeight.linears(parts, x)
    biases = (weights.get(n[: -len("weight")] + "bias") for n in FUSED[fused])
    return tuple(y if b is None else y + b.to(x.dtype) for y, b in zip(ys, biases))


def embed(weights: dict[str, torch.Tensor | QuantWeight], ids: torch.Tensor, dtype: torch.dtype,
          scale: float = 1.0) -> torch.Tensor:
    """[T] token ids -> [T, hidden] activations, times `scale` (Gemma: sqrt(hidden), rounded to
    the activation dtype first, as transformers' Gemma3TextScaledWordEmbedding does)."""
    w = weights["embed_tokens.weight"]
    if isinstance(w, QuantWeight):  # only the gathered rows are dequantized
        x = w.dequantize(dtype, rows=ids)
    else:  # gather first, then cast: upcasting the whole table would copy vocab x hidden
        x = F.embedding(ids, w).to(dtype)
    # the scale rounded to the activation dtype on the host, multiplied in as a plain number
    # (no host tensor meets the device: this runs inside captured CUDA graphs)
    return x if scale == 1.0 else x * float(torch.tensor(scale).to(dtype))


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def act_mul(act: str, gate: torch.Tensor, up: torch.Tensor,
            feeds: QuantWeight | torch.Tensor | None = None) -> torch.Tensor:
    """ACTIVATIONS[act](gate) * up: one kernel on CUDA (`feeds` as rms_norm's)."""
    if fused.usable(gate, up):
        index = _plane_index(feeds, gate)
        if index is None:
            return fused.act_mul(gate, up, act)
        out, outp = fused.act_mul_planes(gate, up, act, index)
        return _remember(out, feeds, outp)
    return ACTIVATIONS[act](gate) * up


def gated_mlp(p: LlamaParams, weights: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """down(act(gate(h)) * up(h)): SwiGLU (silu) or GeGLU (tanh GELU), by `p.hidden_act`."""
    gate, up = linears(weights, "mlp.gate_up_proj.weight", h)
    down = "mlp.down_proj.weight"
    return linear(weights, down, act_mul(p.hidden_act, gate, up, weights.get(down)))


def self_attention(p: LlamaParams, weights: dict[str, torch.Tensor], h: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, batch: PassBatch, layer: int,
                   cudnn: bool = False) -> torch.Tensor:
    """The attention sub-block over the normed rows h [T, hidden]: q/k/v projections (biases
    where stored), per-head q/k RMSNorm if `p.qk_norm`, rotary embedding, the paged KV cache
    (full or this layer's sliding window, gdsllm.models.attention), o_proj. Returns [T, hidden]."""
    T = h.shape[0]
    hd, nh, nkv = p.head_dim, p.num_attention_heads, p.num_key_value_heads
    # The projections run once over all tokens of all sequences: one large matmul per weight
    # is what makes a weight pass serve a whole batch for the price of one.
    qkv = fused_linear(weights, "self_attn.qkv_proj.weight", h)
    if qkv is not None and not p.qk_norm:
        # q and k side by side in one tensor (the CPU's fused int4, eager: never in a CUDA
        # graph): one rotary embedding over both, elementwise as for each: 0.45-0.49 against
        # 0.75-0.82 ms a token over 30 blocks (benchmarks/bench_cpu_ops.py, best of 20,
        # 2026-12-04, load average 2.8-4.4); its factors made once per pass (apply_rope_flip)
        qk = apply_rope_flip(qkv[:, : (nh + nkv) * hd].view(T, nh + nkv, hd),
                             *batch.memo("rope_flip", rope_flip_factors, cos, sin))
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, (nh + nkv) * hd:].view(T, nkv, hd)
    else:
        q, k, v = (linears(weights, "self_attn.qkv_proj.weight", h) if qkv is None
                   else qkv.split(weights["self_attn.qkv_proj.weight"].sizes, dim=-1))
        q, k, v = q.view(T, nh, hd), k.view(T, nkv, hd), v.view(T, nkv, hd)
        if p.qk_norm:
            off = p.norm_weight_offset
            q = rms_norm(q, weights["self_attn.q_norm.weight"], p.rms_norm_eps, off)
            k = rms_norm(k, weights["self_attn.k_norm.weight"], p.rms_norm_eps, off)
        q, k = apply_rope_qk(q, k, cos, sin)
    scale = (p.query_pre_attn_scalar or hd) ** -0.5
    a = attend(batch, layer, q, k, v, scale, p.layer_window(layer), cudnn)
    assert a.shape == (T, nh * hd), a.shape
    return linear(weights, "self_attn.o_proj.weight", a)


def lm_head(p: LlamaParams, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head over the rows given ([B, hidden]); float32 logits [B, vocab],
    soft-capped as cap * tanh(logits / cap) where `p.final_logit_softcapping` is set."""
    h = rms_norm(x, weights["norm.weight"], p.rms_norm_eps, p.norm_weight_offset)
    logits = linear(weights, "lm_head.weight", h)
    cap = p.final_logit_softcapping
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()
