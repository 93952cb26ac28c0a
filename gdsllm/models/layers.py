"""Pieces every model family shares, written once: rotary embeddings, RMSNorm, the embedding
gather, the attention call over each sequence's KV cache, and `linear`, the one place where a
stored weight meets a matmul (a quantized weight plugs in there).

Every function takes only its own unit's weights (the views `gdsllm.engine.views.unit_tensors` gives),
so unit k runs with nothing but unit k resident. Activations are flattened over all tokens of all
sequences of a batch ([T, hidden]); only attention looks at sequence boundaries, through the
`Segment`s the runner passes (one per sequence, each with its KV cache).

The numerics follow Hugging Face transformers' `modeling_llama` exactly where it matters for
bit-closeness: RMSNorm in float32 and cast back before the weight multiply, rotary cos/sin built in
float32 and cast to the activation dtype, Llama-3 frequency scaling as `_compute_llama3_parameters`.

    x = embed(w_embed, ids, dtype)
    cos, sin = rope_cos_sin(rope_inv_freq(p).to(device), positions, dtype)
    q = linear(weights, "self_attn.q_proj.weight", h)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gdsllm.format.metadata import LlamaParams
from gdsllm.engine.kv_cache import KVCache
from gdsllm.quant.schemes import QuantWeight


def rope_inv_freq(p: LlamaParams) -> torch.Tensor:
    """Inverse rotary frequencies (float32, [head_dim // 2], on the CPU as transformers computes
    them, so they are bit-identical there; move them), with Llama-3 scaling if configured."""
    dim = p.head_dim
    inv_freq = 1.0 / (p.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(
        dtype=torch.float) / dim))
    rs = p.rope_scaling or {}
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3')")
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' LlamaRMSNorm: float32 statistics, cast back, then times the weight."""
    in_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(in_dtype) * h.to(in_dtype)


def linear(weights: dict[str, torch.Tensor | QuantWeight], name: str, x: torch.Tensor) -> torch.Tensor:
    """x @ weights[name].T, in x's dtype. On the CPU backend weights stored as fp16/bf16 are upcast
    here, once per unit and pass; on CUDA the compute dtype is the stored dtype and this is a
    no-op view. A quantized weight goes to its backend's kernel (gdsllm.quant.kernels_*)."""
    w = weights[name]
    if isinstance(w, QuantWeight):
        return w.linear(x)
    return F.linear(x, w.to(x.dtype))


def embed(weights: dict[str, torch.Tensor | QuantWeight], ids: torch.Tensor, dtype: torch.dtype
          ) -> torch.Tensor:
    """[T] token ids -> [T, hidden] activations."""
    w = weights["embed_tokens.weight"]
    if isinstance(w, QuantWeight):  # only the gathered rows are dequantized
        return w.dequantize(dtype, rows=ids)
    # Gather first, then cast: upcasting the whole table would copy vocab x hidden every pass.
    return F.embedding(ids, w).to(dtype)


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class Segment:
    """One sequence's rows [start, end) of the flattened batch, and its KV cache."""

    start: int
    end: int
    cache: KVCache


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
              cudnn: bool = False) -> torch.Tensor:
    """q: [heads, n, hd]; k, v: [kv_heads, past + n, hd] (cache included). Returns [n, heads*hd].

    Causal within the new chunk; every new token sees all `past` cached tokens. The SDPA call is
    the one transformers makes (4-D, batch 1, enable_gqa, explicit scale, is_causal for a prompt,
    no mask for one token), so with `cudnn=True` the same fused kernel is picked on CUDA; by
    default cuDNN is left out there (see _CUDA_SDPA).
    """
    n, hd = q.shape[1], q.shape[2]
    q, k, v = q[None], k[None], v[None]
    kw: dict = dict(scale=hd ** -0.5)
    if q.shape[1] != k.shape[1]:
        if _SDPA_GQA:
            kw["enable_gqa"] = True  # no copy of K/V per query head
        else:  # torch < 2.5: repeat each KV head for its query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    with _sdpa_backends(q.device, cudnn):
        if n == 1:  # one new token attends to everything: no mask
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        elif past == 0:  # a whole prompt: SDPA's own causal mask (upper-left aligned, square here)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        else:  # a chunk after a cached prefix: row i sees keys [0, past + i]
            rows = torch.arange(n, device=q.device)[:, None] + past
            mask = torch.arange(past + n, device=q.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    return out[0].transpose(0, 1).reshape(n, -1)


# Measured on an H200 (torch 2.11, LLaMA-7B shape, one sequence decoding): SDPA's cuDNN backend
# spent 4.6 ms of host time per call (its plan is rebuilt as the KV length grows every token)
# for 4 us of GPU work, 84% of all host time; decode ran at 42 ms/token for 8 blocks. Flash and
# memory-efficient attention have no such set-up cost.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_backends(device: torch.device, cudnn: bool):
    """`cudnn=True` leaves torch's own choice (cuDNN first on Hopper), the kernels transformers
    gets: bit-for-bit comparisons with it need that; serving does not."""
    if device.type != "cuda" or cudnn:
        return contextlib.nullcontext()
    return sdpa_kernel(_CUDA_SDPA)


