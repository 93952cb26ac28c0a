"""Triton GEMMs over quantized weights as stored: W4A16 (the int4 tile layout) and W8A16 (row-major
int8), dequantizing in registers; and the same dequantization written into a caller's buffer.

    y = matmul(x, qw, cfg)           # x [M, K] fp16 / bf16 / fp32 on CUDA -> [M, N] in x's dtype
    dequantize_into(qw, out)         # out [N, K] float, preallocated: the whole weight

One program computes a [BLOCK_M, BLOCK_N] tile of y. Per step of the K axis it loads the packed
words of BLOCK_N weight rows, unpacks them, applies each group's (scale, zero) in float32, casts
to x's dtype and feeds a tensor-core `tl.dot` with float32 accumulation (BLOCK_M >= 16), or, for
a few rows (BLOCK_M < 16), multiplies in float32 and sums along K. With split_k > 1, programs
along K each write a float32 partial, summed after. The weight crosses HBM
once per BLOCK_M rows of x, as packed bytes: M = 1 reads 0.5 (int4) or 1 (int8) byte per weight.

int4 (`gdsllm.quant.int4pack`): one step is one k-block `ko` of 16*t inputs, whose words for a
row n are 2t consecutive int32 at [n // 8, ko, 4 * (n % 8) .. + 3, 0 .. t/2 - 1]. The program
loads them in (pair of k-tiles j, lane c) order and unpacks nibble p = 4 * odd + i of each, so
column e = 32 j + 8 c + p of the unpacked tile holds input k = 2 (16 j + 4 i + c) + odd of the
block: every 32 consecutive columns are 32 consecutive inputs (one group, since groups are >= 32
inputs), in a fixed order inside. x is permuted once per call into that same order (`permute_x`,
one copy of the activations, never of the weight), so the dot product is over matching pairs.

int8: one step is BLOCK_K = a multiple of the group size (>= 64) consecutive inputs; the tile is
viewed as [BLOCK_N, groups, group] to apply the pairs, inputs past K masked to zero.

Which kernel runs for which M (Triton tile sizes, torch's tinygemm, or dequantize + cuBLAS) is
decided in `gdsllm.quant.kernels_cuda`, by the measurements in its docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gdsllm.quant.schemes import QuantWeight, inner_k_tiles


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch shape of one GEMM launch."""

    block_m: int = 16
    block_n: int = 64
    warps: int = 4
    stages: int = 3
    split_k: int = 1  # programs along K, each writing a float32 partial; summed after


# The tile configurations benchmarks/bench_kernels.py measures (Config fields, in order); the
# ones kernels_cuda.CONFIGS picks are among them, and tests/test_quant.py runs every one.
CANDIDATES = (
    (1, 32, 4, 4, 1), (1, 64, 4, 4, 1), (1, 32, 4, 4, 4), (1, 128, 4, 4, 1), (2, 32, 4, 4, 1),
    (4, 32, 4, 4, 1), (16, 16, 4, 4, 1), (16, 32, 4, 4, 1), (16, 64, 4, 3, 1), (16, 128, 4, 3, 1),
    (16, 16, 4, 4, 4), (16, 32, 4, 4, 4), (16, 64, 4, 3, 4), (16, 32, 4, 4, 8),
    (32, 64, 4, 3, 1), (64, 64, 4, 3, 1), (64, 128, 4, 3, 1), (128, 64, 4, 3, 1), (128, 128, 8, 3, 1),
)


@triton.jit
def _unpack_int4(q_ptr, sc_ptr, offs_n, mask_n, ko, N, KO, G: tl.constexpr, T: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The float32 weights [BLOCK_N, 16 T] of k-block `ko` for rows offs_n, columns in the
    (j, c, odd, i) order of the module docstring."""
    HALF: tl.constexpr = T // 2
    col = tl.arange(0, 2 * T)  # j * 4 + c
    wcol = (col % 4) * HALF + col // 4
    base = ((offs_n // 8) * KO + ko) * (32 * HALF) + (offs_n % 8) * (4 * HALF)
    words = tl.load(q_ptr + base[:, None] + wcol[None, :], mask=mask_n[:, None], other=0)
    shifts = tl.arange(0, 8) * 4
    v = (words[:, :, None] >> shifts[None, None, :]) & 15  # [BLOCK_N, 2T, 8]
    v = tl.reshape(v, (BLOCK_N, HALF, 32)).to(tl.float32)
    grp = (ko * (16 * T) + 32 * tl.arange(0, HALF)) // G
    sp = sc_ptr + (grp[None, :] * N + offs_n[:, None]) * 2
    s = tl.load(sp, mask=mask_n[:, None], other=0.0).to(tl.float32)
    z = tl.load(sp + 1, mask=mask_n[:, None], other=0.0).to(tl.float32)
    w = (v - 8.0) * s[:, :, None] + z[:, :, None]  # exact product, one rounding: dequantize()'s
    return tl.reshape(w, (BLOCK_N, 16 * T))


@triton.jit
def _unpack_int8(q_ptr, sc_ptr, offs_n, mask_n, k0, N, K, stride_qn, G: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The float32 weights [BLOCK_N, BLOCK_K] of inputs k0 .. k0 + BLOCK_K for rows offs_n."""
    NG: tl.constexpr = BLOCK_K // G
    k = k0 + tl.arange(0, BLOCK_K)
    q = tl.load(q_ptr + offs_n[:, None] * stride_qn + k[None, :],
                mask=mask_n[:, None] & (k < K)[None, :], other=0)
    g = k0 // G + tl.arange(0, NG)
    m = mask_n[:, None] & (g * G < K)[None, :]
    sp = sc_ptr + (g[None, :] * N + offs_n[:, None]) * 2
    s = tl.load(sp, mask=m, other=0.0).to(tl.float32)
    z = tl.load(sp + 1, mask=m, other=0.0).to(tl.float32)
    w = tl.reshape(q.to(tl.float32), (BLOCK_N, NG, G)) * s[:, :, None] + z[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _dot(acc, xb, w, IEEE: tl.constexpr):
    """acc += xb @ w.T: on tensor cores from 16 rows of x, below that (a GEMV of few rows) as
    float32 products summed along K, with no layout change of w."""
    if xb.shape[0] < 16:
        return acc + tl.sum(xb.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if IEEE:
        return tl.dot(xb, tl.trans(w.to(xb.dtype)), acc, input_precision="ieee")
    return tl.dot(xb, tl.trans(w.to(xb.dtype)), acc)


@triton.jit
def _w4_gemm(x_ptr, q_ptr, sc_ptr, y_ptr, M, N, KO, stride_xm, stride_ym, stride_ys, per_split,
             G: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             IEEE: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    kk = tl.arange(0, 16 * T)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = tl.program_id(2) * per_split
    for ko in range(start, tl.minimum(start + per_split, KO)):
        w = _unpack_int4(q_ptr, sc_ptr, offs_n, mask_n, ko, N, KO, G, T, BLOCK_N)
        xb = tl.load(x_ptr + offs_m[:, None] * stride_xm + ko * (16 * T) + kk[None, :],
                     mask=mask_m[:, None], other=0.0)
        acc = _dot(acc, xb, w, IEEE)
    tl.store(y_ptr + tl.program_id(2) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w8_gemm(x_ptr, q_ptr, sc_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_ym, stride_ys,
             per_split, G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = tl.program_id(2) * per_split * BLOCK_K
    for k0 in range(start, tl.minimum(start + per_split * BLOCK_K, K), BLOCK_K):
        w = _unpack_int8(q_ptr, sc_ptr, offs_n, mask_n, k0, N, K, stride_qn, G, BLOCK_K, BLOCK_N)
        k = k0 + kk
        xb = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        acc = _dot(acc, xb, w, IEEE)
    tl.store(y_ptr + tl.program_id(2) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w4_dequant(q_ptr, sc_ptr, out_ptr, N, KO, G: tl.constexpr, T: tl.constexpr,
                BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ko = tl.program_id(1)
    mask_n = offs_n < N
    w = _unpack_int4(q_ptr, sc_ptr, offs_n, mask_n, ko, N, KO, G, T, BLOCK_N)
    e = tl.arange(0, 16 * T)  # column e = 32 j + 8 c + 4 odd + i -> k = 2 (16 j + 4 i + c) + odd
    k = 2 * (16 * (e // 32) + 4 * (e % 4) + (e // 8) % 4) + (e // 4) % 2
    tl.store(out_ptr + offs_n[:, None] * (KO * 16 * T) + ko * (16 * T) + k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _w8_dequant(q_ptr, sc_ptr, out_ptr, N, K, stride_qn, G: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = offs_n < N
    w = _unpack_int8(q_ptr, sc_ptr, offs_n, mask_n, k0, N, K, stride_qn, G, BLOCK_K, BLOCK_N)
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (k < K)[None, :])


def int8_block_k(group_size: int) -> int:
    """The int8 step: a whole number of groups, at least 64 inputs."""
    return group_size * max(1, 64 // group_size)


def permute_x(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [M, K] with each k-block's inputs in the int4 tile's (j, c, odd, i) order (a copy)."""
    t = inner_k_tiles(k)
    m = x.shape[0]
    return x.reshape(m, k // (16 * t), t // 2, 4, 4, 2).permute(0, 1, 2, 4, 5, 3).reshape(m, k)


def matmul(x: torch.Tensor, w: QuantWeight, cfg: Config = Config()) -> torch.Tensor:
    """x @ W.T for a 2-D x on W's device (any M), reading W as stored."""
    n, k = w.shape
    m = x.shape[0]
    if w.qtype == "int4":
        t = inner_k_tiles(k)
        steps = k // (16 * t)
    else:
        bk = int8_block_k(w.group_size)
        steps = triton.cdiv(k, bk)
    split = max(1, min(cfg.split_k, steps))
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)
    if split == 1:
        y = out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    common = dict(G=w.group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  IEEE=x.dtype == torch.float32, num_warps=cfg.warps, num_stages=cfg.stages)
    if w.qtype == "int4":
        xp = permute_x(x, k)
        _w4_gemm[grid](xp, w.data, w.scales, out, m, n, steps, xp.stride(0), out.stride(-2),
                       out.stride(0) if split > 1 else 0, per_split, T=t, **common)
    else:
        x = x.contiguous()
        _w8_gemm[grid](x, w.data, w.scales, out, m, n, k, x.stride(0), w.data.stride(0),
                       out.stride(-2), out.stride(0) if split > 1 else 0, per_split,
                       BLOCK_K=bk, **common)
    if split > 1:
        y = out.sum(0, dtype=x.dtype)
    return y


def dequantize_into(w: QuantWeight, out: torch.Tensor, block_n: int = 32) -> torch.Tensor:
    """Write the float weight [N, K] into `out` (contiguous, numel N*K, any float dtype)."""
    n, k = w.shape
    assert out.is_contiguous() and out.numel() == n * k, (tuple(out.shape), w.shape)
    if w.qtype == "int4":
        t = inner_k_tiles(k)
        _w4_dequant[(triton.cdiv(n, block_n), k // (16 * t))](w.data, w.scales, out, n,
                                                               k // (16 * t), G=w.group_size,
                                                               T=t, BLOCK_N=block_n)
    else:
        bk = int8_block_k(w.group_size)
        _w8_dequant[(triton.cdiv(n, block_n), triton.cdiv(k, bk))](
            w.data, w.scales, out, n, k, w.data.stride(0), G=w.group_size, BLOCK_K=bk,
            BLOCK_N=block_n)
    return out.view(n, k)
