"""A forward pass written by hand over `gdsllm.torch.stream_layers`, checked against gdsllm.LLM.

The model streams through a few buffers (the next units are read while this one computes); the
math below is plain PyTorch, one function per piece of a LLaMA block. Its float32 logits are
compared with LLM's (the runtime's own forward, on the CPU) for every position of the prompt.

    python examples/custom_forward.py                       # the embedded default model
    python examples/custom_forward.py -m ~/models/tiny -p "Hello there" --window 2
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from gdsllm import LLM
from gdsllm.quant.schemes import QuantWeight
from gdsllm.torch import stream_layers


def mat(w) -> torch.Tensor:
    """A stored weight as float32 (a quantized one dequantized; a float32 one is the view itself)."""
    return w.dequantize(torch.float32) if isinstance(w, QuantWeight) else w.float()


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def rope(x, cos, sin):  # x [T, heads, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def block(p, u, x, cos, sin):
    T, hd = x.shape[0], p.head_dim
    h = rms_norm(x, u["input_layernorm.weight"], p.rms_norm_eps)
    q = rope((h @ mat(u["self_attn.q_proj.weight"]).T).view(T, -1, hd), cos, sin).transpose(0, 1)
    k = rope((h @ mat(u["self_attn.k_proj.weight"]).T).view(T, -1, hd), cos, sin).transpose(0, 1)
    v = (h @ mat(u["self_attn.v_proj.weight"]).T).view(T, -1, hd).transpose(0, 1)
    groups = p.num_attention_heads // p.num_key_value_heads  # grouped-query attention
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = (q @ k.transpose(1, 2)) / hd ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
    x = x + a @ mat(u["self_attn.o_proj.weight"]).T
    h = rms_norm(x, u["post_attention_layernorm.weight"], p.rms_norm_eps)
    gate, up = h @ mat(u["mlp.gate_proj.weight"]).T, h @ mat(u["mlp.up_proj.weight"]).T
    return x + (F.silu(gate) * up) @ mat(u["mlp.down_proj.weight"]).T


def forward(stream, p, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab], one streamed unit at a time."""
    pos = torch.arange(len(ids), dtype=torch.float32)
    inv_freq = 1.0 / p.rope_theta ** (torch.arange(0, p.head_dim, 2).float() / p.head_dim)
    freqs = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)
    cos, sin = freqs.cos(), freqs.sin()
    for unit in stream:  # embed, block.0 .. block.N-1, head; the next ones already being read
        if unit.kind == "embed":
            table = mat(unit["embed_tokens.weight"])
            x = table[ids]
            tied = table.clone() if p.tie_word_embeddings else None  # the view goes with the unit
        elif unit.kind == "block":
            x = block(p, unit, x, cos, sin)
        elif unit.kind == "head":
            head = tied if tied is not None else mat(unit["lm_head.weight"])
            return rms_norm(x, unit["norm.weight"], p.rms_norm_eps) @ head.T
    raise RuntimeError("the model has no head unit")


def unsupported(meta) -> str | None:
    p = meta.params
    if meta.architecture not in ("llama", "mistral") or p.num_experts:
        return f"architecture {meta.architecture}"
    for field in ("attention_bias", "attention_out_bias", "mlp_bias", "qk_norm", "rope_scaling",
                  "sliding_window", "final_logit_softcapping"):
        if getattr(p, field):
            return field
    if p.hidden_act != "silu" or p.embed_scale != 1.0 or p.norm_weight_offset:
        return "a Gemma-style block"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GdsLLM model directory (default: the embedded model)")
    ap.add_argument("-p", "--prompt", default="The capital of France is")
    ap.add_argument("--window", type=int, default=2, help="units read ahead (default 2)")
    ap.add_argument("--budget", default=None, help="bytes for the stream's buffers, e.g. 64MiB")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest |difference| allowed (default 1e-4)")
    args = ap.parse_args()

    # the reference, and the tokenizer; cpu_exact: float32 math over quantized weights too, as
    # here (by default the CPU runs int4 / int8 weights with bfloat16 / float16 activations)
    llm = LLM(args.model, device="cpu", cpu_exact=True)
    problem = unsupported(llm.meta)
    if problem:
        print(f"custom_forward.py: this hand-written forward is LLaMA's; {llm.meta.root} has {problem}",
              file=sys.stderr)
        return 2
    ids = llm.tokenizer.encode(args.prompt) if llm.tokenizer else [1, 2, 3, 4]
    with stream_layers(llm.meta.root, budget=args.budget, window=args.window, device="cpu") as s:
        print(f"streaming {len(s.order)} units through {s.buffers} buffers of {s.buffer_bytes} bytes "
              f"(io path {s.io_path})")
        mine = forward(s, llm.meta.params, ids)
        print(f"read {s.bytes_read} bytes in {s.units_read} units")
    ref = llm.logits(ids)
    llm.close()
    diff = (mine - ref).abs().max().item()
    print(f"prompt: {len(ids)} tokens; next token: {mine[-1].argmax().item()} (LLM: {ref[-1].argmax().item()})")
    print(f"max |logits - LLM logits| = {diff:.3g} (tolerance {args.tol:g}; the logits reach "
          f"{ref.abs().max().item():.3g})")
    if not diff <= args.tol:
        print("MISMATCH", file=sys.stderr)
        return 1
    print("match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
