"""Decode attention over a paged KV cache: one call per layer for the whole batch.

    out = decode_attention(q, k_pool, v_pool, block_tables, seq_lens, scale, window=None)

q [B, H, D] is one new token per sequence (H = kv_heads * group: GQA, or MHA with group 1).
k_pool, v_pool [num_blocks, block_size, kv_heads, D] hold every sequence's keys and values: the
token at position t of sequence b lives in block `block_tables[b, t // block_size]` at offset
`t % block_size` (block_tables int32 [B, max_blocks], seq_lens int32 [B], both on q's device).
seq_lens[b] counts the cached tokens including the new one, whose key/value are already in the
pool; row b is the query at position seq_lens[b] - 1 and sees positions
[max(0, len - window), len), or all of [0, len) with window None (seq_lens[b] <= max_blocks *
block_size: the kernel does not check it on the device). Returns [B, H * D] in q's dtype.
Entries of block_tables past a sequence's blocks may be any block index (they are never read by
the kernel, and masked by the reference); a row with seq_lens 0 (batch padding) returns zeros.

Nothing here reads a device value on the host and every shape is fixed by the arguments' shapes,
so a call can be captured in a CUDA graph and replayed with new seq_lens / block_tables contents.

- decode_attention_ref: pure torch (gather + masked softmax in float32), CPU or CUDA; the
  numerical reference and the CPU path.
- decode_attention_triton: flash-decoding in Triton. One program per (sequence, kv head, split)
  computes all `group` query heads of that kv head (one tl.dot, the heads padded to 16) with an
  online softmax in float32 over its share of the sequence's positions; with more than one split
  (short batches, long contexts: the number is fixed from the shapes and the GPU's SM count) a
  second kernel merges the splits by their log-sum-exp. benchmarks/bench_attention.py times it.
- decode_attention: Triton on CUDA when triton is importable, else the reference.
"""
from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

_LOG2E = 1.4426950408889634


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """The batched decode attention of one layer (module docstring): Triton on CUDA, else torch."""
    if q.is_cuda and triton is not None:
        return decode_attention_triton(q, k_pool, v_pool, block_tables, seq_lens, scale, window)
    return decode_attention_ref(q, k_pool, v_pool, block_tables, seq_lens, scale, window)


def decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         window: int | None = None) -> torch.Tensor:
    """Gathers every block of every row's table, masks positions outside [start, len) and takes
    a float32 softmax. Memory: B * max_blocks * block_size * kv_heads * D floats for K and V."""
    b, h, d = q.shape
    nb, bs, kvh, _ = k_pool.shape
    group = h // kvh
    tables = block_tables.long().clamp(0, nb - 1)  # padding entries: any index is masked below
    slots = (tables[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(b, -1)
    k = k_pool.reshape(-1, kvh, d)[slots].float()  # [B, L, kvh, D]
    v = v_pool.reshape(-1, kvh, d)[slots].float()
    qf = q.float().reshape(b, kvh, group, d)
    scores = torch.einsum("bkgd,blkd->bkgl", qf, k) * scale  # [B, kvh, group, L]
    pos = torch.arange(slots.shape[1], device=q.device)[None, :]
    lens = seq_lens.long()[:, None]
    valid = pos < lens
    if window is not None:
        valid &= pos >= lens - window
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with seq_lens 0: all masked
    v = torch.where(valid[:, :, None, None], v, 0.0)  # unwritten slots may hold NaN; 0 * NaN = NaN
    out = torch.einsum("bkgl,blkd->bkgd", probs, v)
    return out.reshape(b, h * d).to(q.dtype)


def decode_attention_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            window: int | None = None, *, num_splits: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """The Triton kernel (module docstring). `num_splits` (splits of each sequence's positions),
    `block_n` (keys per tile, a power of two >= 16), `num_warps` and `num_stages` (Triton's
    launch options; the stages pipeline the K/V tile loads) default to _num_splits / _config;
    they are arguments for the benchmark and the tests. Runs on CPU tensors under
    TRITON_INTERPRET=1."""
    if triton is None:
        raise RuntimeError("decode_attention_triton needs triton (pip install triton)")
    b, h, d = q.shape
    nb, bs, kvh, dk = k_pool.shape
    if dk != d or h % kvh or v_pool.shape != k_pool.shape:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not fit the pools "
                         f"k {tuple(k_pool.shape)}, v {tuple(v_pool.shape)}")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention: the head dimension of q and the pools must be "
                         "contiguous")
    if k_pool.stride() != v_pool.stride():  # one set of strides in the kernel
        k_pool, v_pool = k_pool.contiguous(), v_pool.contiguous()
    group = h // kvh
    max_blocks = block_tables.shape[1]
    splits = num_splits or _num_splits(b, kvh, max_blocks * bs, q.device)
    bn, warps, stages = _config(d, k_pool.dtype)
    bn, warps, stages = block_n or bn, num_warps or warps, num_stages or stages
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    if splits > 1:
        part = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    else:  # written straight into out: the scratch arguments are unused
        part, lse = out, out
    sk = k_pool.stride()
    _decode_kernel[(b, kvh, splits)](
        q, k_pool, v_pool, block_tables, seq_lens, out, part, lse,
        q.stride(0), q.stride(1), sk[0], sk[1], sk[2], block_tables.stride(0),
        scale * _LOG2E, window or 0, splits, group, d,
        BLOCK_SIZE=bs, SPLIT=splits > 1, BLOCK_N=bn, BLOCK_G=max(16, _pow2(group)),
        BLOCK_D=max(16, _pow2(d)), IEEE=k_pool.dtype == torch.float32, num_warps=warps,
        num_stages=stages)
    if splits > 1:
        _merge_kernel[(b, h)](part, lse, out, splits, d, BLOCK_S=_pow2(splits),
                              BLOCK_D=max(16, _pow2(d)))
    return out.reshape(b, h * d)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _config(d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages). Chosen by compiling for sm_90 without a GPU (no
    register spills; K/V tiles loaded with cp.async, pipelined); not measured yet: the lead picks
    by benchmarks/bench_attention.py --sweep on the H200."""
    if dtype == torch.float32:  # tests and CPU-sized models: (64, 4, *) spills in float32
        return 32, 8, 2
    return (32, 8, 3) if d > 128 else (64, 4, 3)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter on CPU: any fixed figure (an H200 has 132 SMs)
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Splits per sequence so that batch * kv_heads * splits programs fill the GPU about twice,
    none of them shorter than 256 positions at max_len. From the shapes only (CUDA graphs)."""
    programs = batch * kv_heads
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(math.ceil(2 * sms / programs), math.ceil(max_len / 256), 32))


if triton is not None:
    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, out_ptr, part_ptr, lse_ptr,
                       stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_bt,
                       qk_scale, window, num_splits, group: tl.constexpr,
                       head_dim: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_N: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """One (sequence, kv head, split): the `group` query heads over positions [s0, s1)."""
        b = tl.program_id(0)
        kh = tl.program_id(1)
        split = tl.program_id(2)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < group
        mask_d = offs_d < head_dim
        heads = kh * group + offs_g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)
        end = tl.load(len_ptr + b)
        start = tl.where(window > 0, tl.maximum(end - window, 0), 0)
        per = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_N) * BLOCK_N
        s0 = start + split * per
        s1 = tl.minimum(s0 + per, end)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        head_off = kh.to(tl.int64) * stride_kh + offs_d[None, :]
        for p0 in range(s0, s1, BLOCK_N):
            pos = p0 + tl.arange(0, BLOCK_N)
            inside = pos < s1
            blk = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + pos // BLOCK_SIZE, mask=inside,
                          other=0)
            row = blk.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_ko
            kv_mask = inside[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + row[:, None] + head_off, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + row[:, None] + head_off, mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q.to(k.dtype), tl.trans(k))
            s = tl.where(inside[None, :], s * qk_scale, float("-inf"))  # log2 units
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        has = l > 0
        res = acc / tl.where(has, l, 1.0)[:, None]
        if not SPLIT:
            tl.store(out_ptr + (b * (group * tl.num_programs(1)) + heads)[:, None] * head_dim
                     + offs_d[None, :], res.to(out_ptr.dtype.element_ty),
                     mask=mask_g[:, None] & mask_d[None, :])
        else:
            row_bh = b * (group * tl.num_programs(1)) + heads  # [BLOCK_G] rows of part / lse
            tl.store(part_ptr + ((row_bh * num_splits + split) * head_dim)[:, None]
                     + offs_d[None, :], res, mask=mask_g[:, None] & mask_d[None, :])
            tl.store(lse_ptr + row_bh * num_splits + split,
                     tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf")),
                     mask=mask_g)

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, out_ptr, num_splits, head_dim: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (sequence, query head): the splits' partial outputs weighted by 2^lse."""
        row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask_s = offs_s < num_splits
        mask_d = offs_d < head_dim
        lse = tl.load(lse_ptr + row * num_splits + offs_s, mask=mask_s, other=float("-inf"))
        top = tl.max(lse, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: seq_lens 0
        w = tl.exp2(lse - top)
        total = tl.sum(w, axis=0)
        part = tl.load(part_ptr + (row * num_splits + offs_s)[:, None] * head_dim
                       + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        res = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + row * head_dim + offs_d, res.to(out_ptr.dtype.element_ty),
                 mask=mask_d)
