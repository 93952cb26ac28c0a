"""Attention over the paged KV cache for one layer of a batched pass.

The runner describes the pass once (`PassBatch`): where each new token's key/value goes (`slots`)
and, per sequence, which cached slots it reads. A layer then calls `attend`, which writes the
batch's new keys/values into the pool and runs attention in one of two ways:

- decode on CUDA (every sequence brings one token): one call for the whole batch over the block
  tables (gdsllm.models.paged_attention), no Python loop over sequences and no host sync, so a
  CUDA graph can capture it;
- otherwise (prompts, chunked prefill, speculative chunks, and decode on the CPU): per
  sequence, its keys gathered from the pool and SDPA with transformers' masks (`attention`),
  bit-close to transformers. On the CPU this serves decode too: one SDPA over the sequence's own
  keys took 28 us against the batched reference's 91 us at 80 cached tokens, 150 us against
  445 us at 1,000 (SmolLM2-135M's heads, 1 thread, 2026-12-03, load average 3.3). A
  speculative token tree (gdsllm.engine.tree) brings its own mask: each tree node sees the
  sequence's prefix and its own ancestors only (`Segment.mask`, `Segment.positions`). A lone
  sequence's one new token over consecutive keys (the CPU's decode of one request) takes
  `_decode_span`: the same SDPA call on the same views, built with fewer torch calls (with the
  rotary embedding by one flip, gdsllm.models.layers.apply_rope_flip: `LLM` decode of the
  default model 64.7 -> 69.6 tokens/s, 10 interleaved rounds in one process, 2 threads,
  2026-12-04 19:49 UTC, load average 1.0-1.3, the same tokens).

    batch = PassBatch(cache, slots, segments, block_tables=None, seq_lens=None)
    out = attend(batch, layer, q, k, v, scale=hd ** -0.5, window=None)   # [T, heads * hd]
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gdsllm.models.kv_cache import PagedKVCache
from gdsllm.models.paged_attention import decode_attention


@dataclass
class Segment:
    """One sequence's rows [start, end) of the flattened batch: `past` tokens cached before them,
    `keys` the flat slots of positions [0, past + end - start) (device tensor). A token tree
    adds `mask` [end - start, past + end - start] (bool: which keys each row sees) and
    `positions` [past + end - start] (the rotary position of each key; the rows are the last
    end - start keys), so that sliding windows measure distance in positions, not slots.
    `first`: set where the keys are consecutive slots (a sequence whose blocks follow each other,
    as one sequence's usually do): attention then reads them as views of the pool instead of
    gathering a copy, the same values. The CPU's decode of the default model (`LLM`, 1 thread,
    6 interleaved rounds of 64 tokens, 2026-12-04, load average 3.6-3.8): median 63.1 tokens/s
    with the views, 60.0 with the copies (60 index_select a token)."""

    start: int
    end: int
    past: int
    keys: torch.Tensor
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    first: int | None = None  # where `keys` are the consecutive slots first, first + 1, ...


@dataclass
class PassBatch:
    """What attention needs to know of a pass. `slots` [T]: the flat slot of each new token.
    Decode passes (one token per sequence) carry `block_tables` [B, max_blocks] (int32) and
    `seq_lens` [B] (int32, new token included) and may have padding rows (graph buckets);
    other passes carry `segments`."""

    cache: PagedKVCache
    slots: torch.Tensor
    segments: list[Segment] | None = None
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    memos: dict = field(default_factory=dict)

    def memo(self, name: str, make, *args):
        """make(*args), made once per pass where every layer would make it alike from the same
        tensors (e.g. gdsllm.models.layers.rope_flip_factors): remade when `args` are other
        objects than last time. Eager only: not for a CUDA graph's static buffers, which are
        refilled in place."""
        got = self.memos.get(name)
        if got is None or any(a is not b for a, b in zip(got[0], args)):
            got = self.memos[name] = (args, make(*args))
        return got[1]

    @property
    def decode(self) -> bool:
        return self.block_tables is not None


def attend(batch: PassBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           scale: float, window: int | None = None, cudnn: bool = False) -> torch.Tensor:
    """q [T, heads, hd], k/v [T, kv_heads, hd] of the batch's new tokens -> [T, heads * hd]."""
    cache = batch.cache
    cache.write(layer, batch.slots, k, v)
    if batch.decode:
        return decode_attention(q, cache.k[layer], cache.v[layer], batch.block_tables,
                                batch.seq_lens, scale, window)
    segs = batch.segments
    if (len(segs) == 1 and segs[0].first is not None and segs[0].mask is None
            and segs[0].end - segs[0].start == 1 and not q.is_cuda
            and (window is None or segs[0].keys.shape[0] <= window)):
        return _decode_span(cache, layer, q, segs[0], scale)
    outs = []
    for seg in segs:
        if seg.first is not None:
            ks, vs = cache.span(layer, seg.first, seg.keys.shape[0])
        else:
            ks, vs = cache.gather(layer, seg.keys)
        qs = q[seg.start:seg.end].transpose(0, 1)
        if seg.mask is not None:
            outs.append(tree_attention(qs, ks, vs, seg.mask, seg.positions, cudnn, scale, window))
        else:
            outs.append(attention(qs, ks, vs, seg.past, cudnn, scale=scale, window=window))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _decode_span(cache: PagedKVCache, layer: int, q: torch.Tensor, seg: Segment,
                 scale: float) -> torch.Tensor:
    """`attention` for one sequence's one new token over its consecutive cached keys (the CPU's
    decode of a lone sequence): the same SDPA call on the same values, its 4-D operands made as
    one strided view each (cache.span4) instead of a slice, transpose and unsqueeze apiece."""
    nh, hd = q.shape[1], q.shape[2]
    L = seg.keys.shape[0]
    k, v = cache.span4(layer, seg.first, L)
    s0, s1, s2 = q.stride()  # q[start:start + 1].transpose(0, 1)[None], as one view
    q4 = q.as_strided((1, nh, 1, hd), (nh * s1, s1, s0, s2), q.storage_offset() + seg.start * s0)
    kw: dict = dict(scale=hd ** -0.5 if scale is None else scale)
    if nh != k.shape[1]:
        if not _SDPA_GQA:
            return attention(q4[0], k[0], v[0], seg.past, scale=scale)
        kw["enable_gqa"] = True
    return F.scaled_dot_product_attention(q4, k, v, **kw)[0].transpose(0, 1).reshape(1, -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
              cudnn: bool = False, scale: float | None = None, window: int | None = None
              ) -> torch.Tensor:
    """q: [heads, n, hd]; k, v: [kv_heads, L, hd], the keys the chunk may see and its own
    (L = past + n, the first at position past + n - L). Returns [n, heads*hd].

    Causal within the new chunk; every new token sees all `past` cached tokens, or with `window`
    only the last `window` positions up to its own (transformers' sliding-window mask). The SDPA
    call is the one transformers makes (4-D, batch 1, enable_gqa, explicit scale, is_causal for a
    prompt, no mask for one token), so with `cudnn=True` the same fused kernel is picked on CUDA;
    by default cuDNN is left out there (see _CUDA_SDPA). `scale`: default head_dim ** -0.5.
    """
    n, hd, L = q.shape[1], q.shape[2], k.shape[1]
    first = past + n - L  # position of k[:, 0]
    q, k, v, kw = _sdpa_args(q, k, v, scale)
    windowed = window is not None and past + n > window  # else the window hides nothing
    with _sdpa_backends(q.device, cudnn):
        if n == 1 and (not windowed or L <= window):  # one new token sees all it was given
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        elif past == 0 and not windowed:  # a whole prompt: SDPA's causal mask (square here)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        else:  # row i (position past + i) sees keys at positions (past + i - window, past + i]
            rows = torch.arange(n, device=q.device)[:, None] + past
            keys = torch.arange(L, device=q.device)[None, :] + first
            mask = keys <= rows
            if windowed:
                mask &= keys > rows - window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    return out[0].transpose(0, 1).reshape(n, -1)


def _sdpa_args(q, k, v, scale):
    """SDPA's 4-D inputs (batch 1) and keyword arguments: the scale (default head_dim ** -0.5)
    and grouped-query attention without a copy of K/V per query head where torch has it."""
    q, k, v = q[None], k[None], v[None]
    kw: dict = dict(scale=q.shape[-1] ** -0.5 if scale is None else scale)
    if q.shape[1] != k.shape[1]:
        if _SDPA_GQA:
            kw["enable_gqa"] = True  # no copy of K/V per query head
        else:  # torch < 2.5: repeat each KV head for its query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return q, k, v, kw


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   positions: torch.Tensor, cudnn: bool = False, scale: float | None = None,
                   window: int | None = None) -> torch.Tensor:
    """q: [heads, n, hd]; k, v: [kv_heads, L, hd]; mask [n, L]: the keys each row sees (a token
    tree: the prefix and the row's ancestors); positions [L]: each key's position (the rows are
    the last n keys). With `window`, a row also sees only keys less than `window` positions back.
    Returns [n, heads*hd]."""
    n = q.shape[1]
    if window is not None:
        rows = positions[-n:]
        mask = mask & (positions[None, :] > rows[:, None] - window)
    q, k, v, kw = _sdpa_args(q, k, v, scale)
    with _sdpa_backends(q.device, cudnn):
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
