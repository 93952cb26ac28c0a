"""Triton GEMMs over quantized weights as stored: W4A16 (the int4 tile layout) and W8A16 (row-major
int8), dequantizing in registers; and the same dequantization written into a caller's buffer.

    y = matmul(x, qw, cfg)             # x [M, K] fp16 / bf16 / fp32 on CUDA -> [M, N] in x's dtype
    dequantize_into(qw, out)           # out [N, K] float, preallocated: the whole weight
    dequantize_into(qw, out, planes=True); y = F.linear(permute_x(x, qw), out.view(N, K))

Bit planes, never a reshape. The stored words are loaded as they lie (contiguous per weight row)
and split by shifts into planes: int4 words hold 8 nibbles, int8 words (4 bytes of a row viewed as
one int32) 4 bytes. Plane p of a tile of words is a [BLOCK_N, words] matrix of weights whose
inputs lie at fixed strides; the kernel gathers x at those inputs (x is small and stays in L1/L2),
and the product is a sum of one small dot per plane. The values go int -> float by the exponent
trick (`v | 0x4B000000` read as float32 is 2^23 + v, exact), then `(q - 8) * s + z` in float32 (the
product is exact, one rounding: `QuantWeight.dequantize`'s numbers), cast to x's dtype.

int4 (`gdsllm.quant.int4pack`): k-block `ko` of 16T inputs holds, for row n, 2T consecutive int32
words at [n // 8, ko, 4 (n % 8) + c, jw] (c < 4, jw < T/2); nibble p = 4 odd + i of word (c, jw)
is input k = 32 jw + 8 i + 2 c + odd of the block. One group (scale, zero) spans 32 inputs at
least, so a column's group depends on (ko, jw) alone and one scale tile serves all 8 planes.

int8: word w of row n holds inputs 4w .. 4w + 3 (byte b = input 4w + b, two's complement: the
unsigned byte xor 128 is q + 128). A word's 4 inputs share a group (groups are multiples of 16).

Tiles (`Config`): BLOCK_M >= 16 feeds tensor cores (`tl.dot`, float32 accumulation; int4 needs
2T = 16, i.e. K a multiple of 128), as x @ W.T or, `swap`, as W @ x.T: then the weight rows are
the MMA's M side and on Hopper the planes are computed in the wgmma A-operand registers, with no
trip through shared memory (seen in the compiled TTGIR). BLOCK_M < 16 is a GEMV form: float32
products accumulated per column, summed along K once at the end. split_k > 1: programs along K
each write a float32 partial, summed after. The weight crosses HBM once per BLOCK_M rows of x.

`dequantize_into(..., planes=True)` writes each k-block plane after plane (contiguous stores);
`permute_x` puts x in that order, so cuBLAS multiplies the two directly.

Which kernel runs for which M (these tiles, torch's tinygemm, or dequantize + cuBLAS) is decided
in `gdsllm.quant.kernels_cuda`, by the measurements in its docstring.
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
    block_w: int = 16  # int8: int32 words (4 inputs each) per step; int4 steps one k-block
    swap: bool = False  # tensor cores on W @ x.T (weight rows as the MMA's M side), not x @ W.T


# The tile configurations benchmarks/bench_kernels.py measures (Config fields, in order); the
# ones kernels_cuda.CHOICES picks are among them, and tests/test_quant.py runs every one.
CANDIDATES = (
    (1, 32, 4, 3, 4, 16), (1, 64, 4, 3, 4, 16), (1, 32, 4, 3, 8, 16), (1, 128, 4, 3, 2, 32),
    (2, 32, 4, 3, 4, 16), (4, 32, 4, 3, 4, 16), (8, 32, 4, 3, 4, 16),
    (16, 32, 4, 3, 4, 16), (16, 64, 4, 3, 4, 16), (16, 64, 4, 4, 2, 32), (16, 32, 4, 4, 8, 16),
    (16, 128, 4, 3, 2, 32), (16, 64, 4, 3, 1, 32), (32, 64, 4, 3, 2, 32), (32, 128, 4, 3, 1, 32),
    (64, 128, 4, 3, 1, 32), (128, 128, 8, 3, 1, 32),
    (16, 64, 4, 3, 4, 16, True), (16, 64, 4, 3, 8, 16, True), (16, 64, 4, 4, 2, 32, True),
    (16, 128, 4, 3, 2, 32, True), (16, 128, 4, 3, 4, 32, True), (16, 64, 4, 3, 1, 32, True),
    (32, 64, 4, 3, 4, 16, True), (32, 128, 4, 3, 2, 32, True), (64, 64, 4, 3, 2, 32, True),
    (64, 128, 4, 3, 1, 32, True), (128, 128, 8, 3, 1, 32, True), (64, 256, 8, 3, 1, 32, True),
)


def usable(qtype: str, k: int, cfg: Config) -> bool:
    """Whether the GEMM runs this tile at input dimension k (else: dequantize + cuBLAS)."""
    if qtype == "int4":
        return cfg.block_m < 16 or inner_k_tiles(k) == 8
    return k % 4 == 0


@triton.jit
def _int4_plane(words, p: tl.constexpr, s, z):
    """float32 weights of nibble plane p: (q - 8) * s + z."""
    v = ((words >> (4 * p)) & 15) | 0x4B000000  # float32 bits of 2^23: 2^23 + v
    return (v.to(tl.float32, bitcast=True) - 8388616.0) * s + z  # 2^23 + 8


@triton.jit
def _int8_plane(words, b: tl.constexpr, s, z):
    """float32 weights of byte plane b: q * s + z (q signed: the unsigned byte xor 128 is q + 128)."""
    v = (((words >> (8 * b)) & 255) ^ 128) | 0x4B000000
    return (v.to(tl.float32, bitcast=True) - 8388736.0) * s + z  # 2^23 + 128


@triton.jit
def _int4_k(p: tl.constexpr, col, T: tl.constexpr):
    """The input (within its k-block) of plane p's column col = c T/2 + jw: 32 jw + 8 i + 2 c + odd."""
    return 32 * (col % (T // 2)) + 8 * (p % 4) + 2 * (col // (T // 2)) + p // 4


@triton.jit
def _int4_tile(q_ptr, sc_ptr, offs_n, mask_n, ko, N, KO, G: tl.constexpr, T: tl.constexpr):
    """k-block ko of rows offs_n: the words [BLOCK_N, 2T] and their (scale, zero), [BLOCK_N, 2T]
    (or [BLOCK_N, 1] when one group spans the block)."""
    col = tl.arange(0, 2 * T)  # c * T/2 + jw
    base = ((offs_n // 8) * KO + ko) * (16 * T) + (offs_n % 8) * (2 * T)
    words = tl.load(q_ptr + base[:, None] + col[None, :], mask=mask_n[:, None], other=0)
    if G >= 16 * T:
        grp = (ko * (16 * T)) // G + tl.zeros((1,), dtype=tl.int32)
    else:
        grp = (ko * (16 * T) + 32 * (col % (T // 2))) // G
    sp = sc_ptr + (grp[None, :] * N + offs_n[:, None]) * 2
    s = tl.load(sp, mask=mask_n[:, None], other=0.0).to(tl.float32)
    z = tl.load(sp + 1, mask=mask_n[:, None], other=0.0).to(tl.float32)
    return words, s, z


@triton.jit
def _int8_tile(q_ptr, sc_ptr, offs_n, mask_n, w0, N, K4, stride_qn, G: tl.constexpr,
               BLOCK_W: tl.constexpr):
    """Words w0 .. w0 + BLOCK_W of rows offs_n [BLOCK_N, BLOCK_W] and their (scale, zero), the
    same shape (or [BLOCK_N, 1] when one group spans the step: w0 is a multiple of BLOCK_W)."""
    wcol = w0 + tl.arange(0, BLOCK_W)
    m = mask_n[:, None] & (wcol < K4)[None, :]
    words = tl.load(q_ptr + offs_n[:, None] * stride_qn + wcol[None, :], mask=m, other=0)
    if G % (4 * BLOCK_W) == 0:
        grp = (4 * w0) // G + tl.zeros((1,), dtype=tl.int32)
        sm = mask_n[:, None]
    else:
        grp = (4 * wcol) // G
        sm = m
    sp = sc_ptr + (grp[None, :] * N + offs_n[:, None]) * 2
    s = tl.load(sp, mask=sm, other=0.0).to(tl.float32)
    z = tl.load(sp + 1, mask=sm, other=0.0).to(tl.float32)
    return words, s, z


@triton.jit
def _acc(acc, x_ptr, offs_m, mask_m, stride_xm, k, mask_k, w, BLOCK_M: tl.constexpr,
         SWAP: tl.constexpr, IEEE: tl.constexpr):
    """acc += x[:, k] @ w.T for one plane w [BLOCK_N, len(k)], x gathered at inputs k (L1/L2
    resident, small). GEMV (BLOCK_M < 16): per-column products, acc [BM, BN, len(k)], summed
    along K at the end; else tensor cores, acc [BM, BN] or with SWAP [BN, BM] (W @ x.T)."""
    if BLOCK_M < 16:
        xb = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        out = acc + xb.to(tl.float32)[:, None, :] * w[None, :, :]
    elif SWAP:
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None],
                     mask=mask_m[None, :] & mask_k[:, None], other=0.0)
        if IEEE:
            out = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            out = tl.dot(w.to(x_ptr.dtype.element_ty), xt, acc)
    else:
        xb = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if IEEE:
            out = tl.dot(xb, tl.trans(w), acc, input_precision="ieee")
        else:
            out = tl.dot(xb, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
    return out


@triton.jit
def _store(y_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_ys,
           BLOCK_M: tl.constexpr, SWAP: tl.constexpr):
    y_ptr += tl.program_id(2) * stride_ys
    if BLOCK_M < 16:
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                 tl.sum(acc, axis=2).to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    elif SWAP:
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None],
                 acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])
    else:
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Row counts, loop bounds and split strides are not specialized on (no compile per M or shape)
@triton.jit(do_not_specialize=["M", "KO", "stride_ys", "per_split"])
def _w4_gemm(x_ptr, q_ptr, sc_ptr, y_ptr, M, N, KO, stride_xm, stride_ym, stride_ys, per_split,
             G: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             SWAP: tl.constexpr, IEEE: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    col = tl.arange(0, 2 * T)
    every = col >= 0
    if BLOCK_M < 16:
        acc = tl.zeros((BLOCK_M, BLOCK_N, 2 * T), dtype=tl.float32)
    elif SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = tl.program_id(2) * per_split
    for ko in range(start, tl.minimum(start + per_split, KO)):
        words, s, z = _int4_tile(q_ptr, sc_ptr, offs_n, mask_n, ko, N, KO, G, T)
        for p in tl.static_range(8):
            k = ko * (16 * T) + _int4_k(p, col, T)
            acc = _acc(acc, x_ptr, offs_m, mask_m, stride_xm, k, every,
                       _int4_plane(words, p, s, z), BLOCK_M, SWAP, IEEE)
    _store(y_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_ys, BLOCK_M, SWAP)


@triton.jit(do_not_specialize=["M", "K4", "stride_ys", "per_split"])
def _w8_gemm(x_ptr, q_ptr, sc_ptr, y_ptr, M, N, K4, stride_xm, stride_qn, stride_ym, stride_ys,
             per_split, G: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    if BLOCK_M < 16:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
    elif SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = tl.program_id(2) * per_split * BLOCK_W
    for w0 in range(start, tl.minimum(start + per_split * BLOCK_W, K4), BLOCK_W):
        words, s, z = _int8_tile(q_ptr, sc_ptr, offs_n, mask_n, w0, N, K4, stride_qn, G, BLOCK_W)
        wcol = w0 + tl.arange(0, BLOCK_W)
        for b in tl.static_range(4):
            acc = _acc(acc, x_ptr, offs_m, mask_m, stride_xm, 4 * wcol + b, wcol < K4,
                       _int8_plane(words, b, s, z), BLOCK_M, SWAP, IEEE)
    _store(y_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_ys, BLOCK_M, SWAP)


@triton.jit(do_not_specialize=["KO"])
def _w4_dequant(q_ptr, sc_ptr, out_ptr, N, KO, G: tl.constexpr, T: tl.constexpr,
                BLOCK_N: tl.constexpr, PLANES: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ko = tl.program_id(1)
    mask_n = offs_n < N
    words, s, z = _int4_tile(q_ptr, sc_ptr, offs_n, mask_n, ko, N, KO, G, T)
    col = tl.arange(0, 2 * T)
    row = out_ptr + offs_n[:, None] * (KO * 16 * T) + ko * (16 * T)
    for p in tl.static_range(8):
        w = _int4_plane(words, p, s, z).to(out_ptr.dtype.element_ty)
        if PLANES:  # the order of permute_x: contiguous stores
            k = p * (2 * T) + col
        else:
            k = _int4_k(p, col, T)
        tl.store(row + k[None, :], w, mask=mask_n[:, None])


@triton.jit(do_not_specialize=["K4"])
def _w8_dequant(q_ptr, sc_ptr, out_ptr, N, K4, stride_qn, G: tl.constexpr, BLOCK_W: tl.constexpr,
                BLOCK_N: tl.constexpr, PLANES: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w0 = tl.program_id(1) * BLOCK_W
    mask_n = offs_n < N
    words, s, z = _int8_tile(q_ptr, sc_ptr, offs_n, mask_n, w0, N, K4, stride_qn, G, BLOCK_W)
    wcol = w0 + tl.arange(0, BLOCK_W)
    row = out_ptr + offs_n[:, None] * (4 * K4)
    for b in tl.static_range(4):
        w = _int8_plane(words, b, s, z).to(out_ptr.dtype.element_ty)
        if PLANES:
            k = b * K4 + wcol
        else:
            k = 4 * wcol + b
        tl.store(row + k[None, :], w, mask=mask_n[:, None] & (wcol < K4)[None, :])


def _words8(w: QuantWeight) -> torch.Tensor:
    """The int8 weight [N, K] as int32 words [N, K/4] (a view)."""
    return w.data.view(torch.int32)


def permute_x(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [M, K] with its inputs in the plane order of w's qtype (a contiguous copy)."""
    m, k = x.shape
    if w.qtype == "int4":
        t = inner_k_tiles(k)  # [m, ko, jw, i, c, odd] -> [m, ko, odd, i, c, jw]
        return x.reshape(m, k // (16 * t), t // 2, 4, 4, 2).permute(0, 1, 5, 3, 4, 2).reshape(m, k)
    return x.reshape(m, k // 4, 4).transpose(1, 2).reshape(m, k)


def matmul(x: torch.Tensor, w: QuantWeight, cfg: Config = Config()) -> torch.Tensor:
    """x @ W.T for a 2-D x on W's device (any M; a tile `usable` at W's K), reading W as stored."""
    n, k = w.shape
    m = x.shape[0]
    assert usable(w.qtype, k, cfg), (w.qtype, k, cfg)
    if w.qtype == "int4":
        t = inner_k_tiles(k)
        steps = k // (16 * t)
    else:
        steps = triton.cdiv(k // 4, cfg.block_w)
    split = max(1, min(cfg.split_k, steps))
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)
    if split == 1:
        y = out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    common = dict(G=w.group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SWAP=cfg.swap,
                  IEEE=x.dtype == torch.float32, num_warps=cfg.warps, num_stages=cfg.stages)
    x = x.contiguous()
    if w.qtype == "int4":
        _w4_gemm[grid](x, w.data, w.scales, out, m, n, steps, x.stride(0), out.stride(-2),
                       out.stride(0) if split > 1 else 0, per_split, T=t, **common)
    else:
        q = _words8(w)
        _w8_gemm[grid](x, q, w.scales, out, m, n, k // 4, x.stride(0), q.stride(0),
                       out.stride(-2), out.stride(0) if split > 1 else 0, per_split,
                       BLOCK_W=cfg.block_w, **common)
    if split > 1:
        y = out.sum(0, dtype=x.dtype)
    return y


def dequantize_into(w: QuantWeight, out: torch.Tensor, planes: bool = False,
                    block_n: int = 32) -> torch.Tensor:
    """Write the float weight [N, K] into `out` (contiguous, numel N*K, any float dtype): in
    input order, or with `planes` in the order of `permute_x` (contiguous stores, so quicker;
    then F.linear(permute_x(x, w), out) is x @ W.T)."""
    n, k = w.shape
    assert out.is_contiguous() and out.numel() == n * k, (tuple(out.shape), w.shape)
    if w.qtype == "int4":
        t = inner_k_tiles(k)
        _w4_dequant[(triton.cdiv(n, block_n), k // (16 * t))](
            w.data, w.scales, out, n, k // (16 * t), G=w.group_size, T=t, BLOCK_N=block_n,
            PLANES=planes)
    else:
        q, bw = _words8(w), min(32, max(16, w.group_size // 4))  # one group a step from 64
        _w8_dequant[(triton.cdiv(n, block_n), triton.cdiv(k // 4, bw))](
            q, w.scales, out, n, k // 4, q.stride(0), G=w.group_size, BLOCK_W=bw,
            BLOCK_N=block_n, PLANES=planes)
    return out.view(n, k)
