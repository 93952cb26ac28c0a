"""Decode attention over a paged KV cache (placeholder reference; the Triton kernel lands from
the `attn` branch)."""
from __future__ import annotations

import torch


def decode_attention(q, k_pool, v_pool, block_tables, seq_lens, scale, window=None):
    return decode_attention_ref(q, k_pool, v_pool, block_tables, seq_lens, scale, window)


def decode_attention_ref(q, k_pool, v_pool, block_tables, seq_lens, scale, window=None):
    B, H, D = q.shape
    nb, bs, kvh, _ = k_pool.shape
    L = block_tables.shape[1] * bs
    k = k_pool[block_tables.long()].reshape(B, L, kvh, D).float()
    v = v_pool[block_tables.long()].reshape(B, L, kvh, D).float()
    pos = torch.arange(L, device=q.device)[None, :]
    lens = seq_lens.long()[:, None]
    mask = pos < lens
    if window is not None:
        mask &= pos >= lens - window
    g = H // kvh
    qf = q.float().view(B, kvh, g, D)
    s = torch.einsum("bhgd,blhd->bhgl", qf, k) * scale
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    v = torch.where(mask[:, :, None, None], v, 0.0)
    out = torch.einsum("bhgl,blhd->bhgd", p, v)
    return out.reshape(B, H * D).to(q.dtype)
