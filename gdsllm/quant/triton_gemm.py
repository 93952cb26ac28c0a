"""Triton GEMMs over quantized weights as stored: W4A16 (the int4 tile layout) and W8A16 (row-major
int8), dequantizing in registers; and the same dequantization written into a caller's buffer.

    y = matmul(x, qw, cfg)             # x [M, K] fp16 / bf16 / fp32 on CUDA -> [M, N] in x's dtype
    dequantize_into(qw, out)           # out [N, K] float, preallocated: the whole weight
    dequantize_into(qw, out, planes=True); y = F.linear(permute_x(x, qw), out.view(N, K))

Whole tiles, unpacked in registers. Each step loads the stored words of BLOCK_N rows as they lie
(contiguous per row and k-block: 16-byte loads, pipelined by cp.async over `stages`), splits them
by shifts into planes (int4: 8 nibbles a word; int8: 4 bytes of a row viewed as one int32) and
interleaves the planes back with `tl.join` + `tl.reshape` (register moves) into one weight tile
[BLOCK_N, step], multiplied by x's [BLOCK_M, step] tile in ONE `tl.dot` per step. The values go
int -> float by the exponent trick (`v | 0x4B000000` read as float32 is 2^23 + v, exact). Where
one group spans a step and x is half precision (`Config.after`: groups of 128 with 128-input
steps), the tile holds the bare integers (q - 8 for int4, exact in float16 and bfloat16) and the
group's (scale, zero) apply after the product: s (x w.T) + z sum(x); those integers are unpacked
by PTX two per instruction (`_unpack_asm`, `Config.asm`; not under Triton's interpreter, which
runs no assembly). Otherwise `(q - 8) * s + z` in float32 per weight (`QuantWeight.dequantize`'s
numbers, one rounding), cast to x's dtype.

int4 (`gdsllm.quant.int4pack`): k-block `ko` of 16T inputs holds, for row n, 2T consecutive int32
words at [n // 8, ko, 4 (n % 8) + c, jw] (c < 4, jw < T/2); nibble p = 4 odd + i of word (c, jw)
is input k = 32 jw + 8 i + 2 c + odd of the block. The tile's column 8 w + 2 i + odd holds nibble
p of the row's word w = c T/2 + jw; x is gathered in that order, or (`xperm`) permuted into it
once per call (`gemm_x`: one small copy, cheaper than gathering). A word's 8 nibbles share a
group (groups span 32 inputs at least).

int8: word w of row n holds inputs 4w .. 4w + 3 (byte b = input 4w + b, two's complement: the
unsigned byte xor 128 is q + 128); the tile's columns are in input order. A word's 4 inputs share
a group (groups are multiples of 16).

Tiles (`Config`): BLOCK_M >= 16 feeds tensor cores (`tl.dot`, float32 accumulation) as x @ W.T
or, `swap`, as W @ x.T (the weight rows as the MMA's M side: wgmma on Hopper). BLOCK_M 1 is a
GEMV (float32 products summed per step). split_k > 1: programs along K each write a float32
partial to a workspace; the last of a tile's programs to finish (a per-tile atomic counter in
`lock_buffer`, reset to 0 by that program) sums them in split order (deterministic) and writes y:
no second launch. The weight crosses HBM once per BLOCK_M rows of x.

`dequantize_into(..., planes=True)` writes each k-block plane after plane (contiguous stores);
`permute_x` puts x in that order, so cuBLAS multiplies the two directly.

Which kernel runs for which M (these tiles, torch's tinygemm, or dequantize + cuBLAS) is decided
in `gdsllm.quant.kernels_cuda`, by the measurements in its docstring.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gdsllm.quant.kernels_cuda import SPLIT_K_COUNTERS
from gdsllm.quant.schemes import QuantWeight, inner_k_tiles

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # Triton's CPU interpreter

@dataclass(frozen=True)
class Config:
    """Tile sizes and launch shape of one GEMM launch."""

    block_m: int = 16  # 1: GEMV (float32 products, no tensor cores); 16 and more: tl.dot
    block_n: int = 64
    warps: int = 4
    stages: int = 3
    split_k: int = 1  # programs along K; the last of a tile's to finish sums their partials
    block_k: int = 128  # inputs per step (int4: k-blocks of 16T inputs, at least one)
    swap: bool = False  # tensor cores on W @ x.T (weight rows as the MMA's M side), not x @ W.T
    xperm: bool = False  # int4: x permuted into the tile's column order first (`gemm_x`)
    after: bool = True  # scale after the product where one group spans a step (half precision)
    asm: bool = True  # and then unpack by PTX, two weights per instruction (`_unpack_asm`)
    planes: bool = False  # int4: one tl.dot per nibble plane (`_w4_planes`), x in plane order


# The tile configurations benchmarks/bench_kernels.py measures (Config fields, in order); the
# ones kernels_cuda.CHOICES picks are among them; tests/quant_gemm_cases.py runs them under Triton's
# interpreter. (128, 128, 8, 3, 1, 128) is gone: Triton 3.6 does not compile it for int8 with
# groups narrower than a step on the H200 ("Illegal shared layout", 2026-12-04), and it never won.
CANDIDATES = (
    (1, 16, 4, 4, 4, 256), (1, 16, 4, 4, 8, 256), (1, 32, 4, 3, 4, 256),
    (16, 32, 4, 3, 4, 128), (16, 64, 4, 3, 4, 128, True), (16, 64, 4, 4, 8, 128, True),
    (16, 64, 4, 3, 8, 128, True),
    (16, 64, 8, 3, 4, 128, True), (16, 128, 8, 3, 4, 128, True), (16, 64, 4, 2, 16, 128, True),
    (32, 64, 4, 3, 4, 128, True), (64, 64, 8, 3, 2, 128, True), (64, 128, 8, 3, 1, 128, True),
    (16, 32, 4, 3, 4, 128, False, False, True, False),
    # int4: x permuted (gathering it in the tile's order costs more than the permutation)
    (16, 32, 4, 3, 4, 128, False, True), (16, 64, 4, 3, 4, 128, True, True),
    (16, 64, 4, 4, 8, 128, True, True), (16, 128, 8, 3, 4, 128, True, True),
    (16, 64, 4, 3, 2, 128, True, True), (32, 64, 4, 3, 4, 128, True, True),
    (64, 64, 8, 3, 2, 128, True, True), (64, 128, 8, 3, 1, 128, True, True),
    (16, 64, 4, 3, 4, 128, True, True, True, False),
    # int4 one dot per nibble plane (split_k 0: `auto_split`)
    (16, 128, 4, 3, 0, 128, True, False, True, True, True),
    (16, 128, 4, 3, 0, 128, True, False, True, False, True),
)


def usable(qtype: str, k: int, cfg: Config, group_size: int = 128,
           dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the GEMM runs this tile for a weight of input dimension k in groups of
    `group_size`, times x of `dtype` (else: another tile, or dequantize + cuBLAS). The planes
    tile needs half-precision x, k-blocks of 128 inputs (inner k-tiles 8) and groups that span
    them (scaled after the products)."""
    if cfg.planes:  # and k-blocks of 128 inputs: a plane's dot has K = 16 words
        return (qtype == "int4" and dtype in (torch.float16, torch.bfloat16) and k % 128 == 0
                and group_size % 128 == 0)
    return qtype == "int4" or k % 4 == 0


def auto_split(tiles: int, sms: int) -> int:
    """split_k for `tiles` output tiles where a Config says 0: about two programs per
    multiprocessor, a power of two from 2 to 8. The planes tile on the H200 (132 SMs, 2026-12-04,
    benchmarks/probe_w4_tiles.py): at 8 and 16 rows the best of splits 2 / 4 / 8 was 8 for
    4096x4096 and 4096x11008 (32 tiles of 128 rows) and 4 for 11008x4096 (86 tiles); at 32 rows
    4 / 4 / 2; at 64 rows within 5% of the best at 2."""
    want = 2 * sms / max(1, tiles)
    return max(2, min(8, 1 << max(0, round(math.log2(max(want, 1.0))))))


@triton.jit
def _int4_q(words, p: tl.constexpr):
    """float32 q - 8 of nibble plane p (exact)."""
    v = ((words >> (4 * p)) & 15) | 0x4B000000  # float32 bits of 2^23: 2^23 + v
    return v.to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8


@triton.jit
def _int4_plane(words, p: tl.constexpr, s, z):
    """float32 weights of nibble plane p: (q - 8) * s + z."""
    return _int4_q(words, p) * s + z


@triton.jit
def _int8_q(words, b: tl.constexpr):
    """float32 q of byte plane b (exact; q signed: the unsigned byte xor 128 is q + 128)."""
    v = (((words >> (8 * b)) & 255) ^ 128) | 0x4B000000
    return v.to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128


@triton.jit
def _int8_plane(words, b: tl.constexpr, s, z):
    """float32 weights of byte plane b: q * s + z."""
    return _int8_q(words, b) * s + z


@triton.jit
def _plane(words, p: tl.constexpr, s, z, INT4: tl.constexpr, SCALED: tl.constexpr,
           DT: tl.constexpr):
    """Plane p in DT: the weights (SCALED) or the bare integers (q - 8 for int4), exact."""
    if INT4:
        v = _int4_q(words, p)
    else:
        v = _int8_q(words, p)
    if SCALED:
        v = v * s + z
    return v.to(DT)


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
def _int8_words(q_ptr, offs_n, mask_n, w0, K4, stride_qn, BLOCK_W: tl.constexpr):
    """Words w0 .. w0 + BLOCK_W of rows offs_n [BLOCK_N, BLOCK_W], and their mask."""
    wcol = w0 + tl.arange(0, BLOCK_W)
    m = mask_n[:, None] & (wcol < K4)[None, :]
    return tl.load(q_ptr + offs_n[:, None] * stride_qn + wcol[None, :], mask=m, other=0), m


@triton.jit
def _int8_tile(q_ptr, sc_ptr, offs_n, mask_n, w0, N, K4, stride_qn, G: tl.constexpr,
               BLOCK_W: tl.constexpr):
    """Words w0 .. w0 + BLOCK_W of rows offs_n [BLOCK_N, BLOCK_W] and their (scale, zero), the
    same shape (or [BLOCK_N, 1] when one group spans the step: w0 is a multiple of BLOCK_W)."""
    words, m = _int8_words(q_ptr, offs_n, mask_n, w0, K4, stride_qn, BLOCK_W)
    wcol = w0 + tl.arange(0, BLOCK_W)
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


def _unpack_asm(int4: bool, magic: int, sub: int) -> str:
    """PTX for two int32 words ($8, $9; int8: $4, $5) -> a register per plane ($0 .. $7; int8 $0
    .. $3) of two half-precision integers: the plane of the first word low, of the second high. int4: (w >> 4j) & 0x000F000F | magic puts nibbles
    j and j + 4 of a word into the mantissas of a pair (one LOP3 for two weights), minus `sub` (a
    packed subtraction) leaves q - 8; int8: (w >> 8j) & 0x00FF00FF ^ magic, bytes j and j + 2,
    leaves q. PRMT then pairs the two words' values of one plane."""
    half = "bf16x2" if magic == 0x43004300 else "f16x2"
    lut = "0xea" if int4 else "0x6a"  # (a & b) | c, (a & b) ^ c
    mask = "0x000f000f" if int4 else "0x00ff00ff"
    shifts = (0, 4, 8, 12) if int4 else (0, 8)
    lines = [".reg .b32 c, s, t<4>, u<4>;", f"mov.b32 c, {magic:#x};"]
    first = 8 if int4 else 4  # the inputs follow the outputs
    for j, sh in enumerate(shifts):
        for r, src in (("t", f"${first}"), ("u", f"${first + 1}")):
            if sh:
                lines.append(f"shr.b32 s, {src}, {sh};")
            lines.append(f"lop3.b32 {r}{j}, {'s' if sh else src}, {mask}, c, {lut};")
    lines += [f"mov.b32 c, {sub:#x};", "mov.b32 s, 0x3f803f80;"]  # s: bfloat16 1.0, twice
    for j in range(len(shifts)):
        if half == "bf16x2":  # x * 1 + c: exact (sub.bf16x2 needs sm_90, fma sm_80)
            lines += [f"fma.rn.bf16x2 {r}{j}, {r}{j}, s, c;" for r in "tu"]
        else:
            lines += [f"sub.f16x2 {r}{j}, {r}{j}, c;" for r in "tu"]
    # register j holds planes (j, j + 4) for int4, (2j, 2j + 1)... as (low, high) halves
    planes = [(j, j + 4) for j in range(4)] if int4 else [(0, 2), (1, 3)]
    for j, (lo, hi) in enumerate(planes):
        lines.append(f"prmt.b32 ${lo}, t{j}, u{j}, 0x5410;")
        lines.append(f"prmt.b32 ${hi}, t{j}, u{j}, 0x7632;")
    return "{\n" + "\n".join(lines) + "\n}"


# magic: 128 (bfloat16) / 1024 (float16) in both halves; sub: magic + 8 (int4) or + 128 (int8)
_ASM4_BF16 = tl.constexpr(_unpack_asm(True, 0x43004300, 0xC308C308))  # fma: + (-136)
_ASM4_F16 = tl.constexpr(_unpack_asm(True, 0x64006400, 0x64086408))
_ASM8_F16 = tl.constexpr(_unpack_asm(False, 0x64806480, 0x64806480))


@triton.jit
def _int4_planes_asm(words, DT: tl.constexpr):
    """The 8 nibble planes of words as q - 8 in DT (half precision), by `_unpack_asm`."""
    if DT == tl.bfloat16:
        out = tl.inline_asm_elementwise(_ASM4_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words],
                                        dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise(_ASM4_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words],
                                        dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    return out


@triton.jit
def _int8_planes_asm(words):
    """The 4 byte planes of words as q in float16, by `_unpack_asm`."""
    return tl.inline_asm_elementwise(_ASM8_F16, "=r,=r,=r,=r,r,r", [words],
                                     dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                     is_pure=True, pack=2)


@triton.jit
def _int4_scales(sz_ptr, offs, mask):
    """float32 (scale, zero) of the bfloat16 pairs at offs, each read as one int32 (bfloat16 ->
    float32 is a 16-bit shift)."""
    sz = tl.load(sz_ptr + offs, mask=mask, other=0)
    return (sz << 16).to(tl.float32, bitcast=True), (sz & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _int4_step(q_ptr, sz_ptr, offs_n, mask_n, ko0, N, KO, G: tl.constexpr, T: tl.constexpr,
               KB: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, SCALED: tl.constexpr,
               ASM: tl.constexpr):
    """k-blocks ko0 .. ko0 + KB of rows offs_n as weights [BLOCK_N, KB * 16T] in DT (SCALED;
    else the integers q - 8, scaled after the product by `_mac_after`). Column cc
    holds nibble p = 4 odd + i (r = cc % 8 = 2 i + odd) of the row's word cc // 8 (k-block
    ko0 + cc // 16T, word w = cc // 8 % 2T): the words are loaded as stored (contiguous, wide
    loads), split into 8 planes and interleaved in registers (joins, no data movement)."""
    W: tl.constexpr = 2 * T
    col = tl.arange(0, KB * W)
    ko = ko0 + col // W
    m = mask_n[:, None] & (ko < KO)[None, :]
    words = tl.load(q_ptr + ((offs_n // 8) * KO * (16 * T) + (offs_n % 8) * W)[:, None]
                    + (ko * (16 * T) + col % W)[None, :], mask=m, other=0)
    s = 0.0
    z = 0.0
    if SCALED:
        if G >= 16 * T * KB:  # one group spans the step: (scale, zero) [BLOCK_N, 1]
            grp = (ko0 * (16 * T)) // G + tl.zeros((1,), dtype=tl.int32)
            sm = mask_n[:, None]
        else:  # per word: its 8 nibbles lie within 32 inputs, one group
            grp = (ko * (16 * T) + 32 * (col % W % (T // 2))) // G
            sm = m
        s, z = _int4_scales(sz_ptr, grp[None, :] * N + offs_n[:, None], sm)
    if ASM:  # the integers, two per instruction (not SCALED, half precision)
        p0, p1, p2, p3, p4, p5, p6, p7 = _int4_planes_asm(words, DT)
    else:
        p0 = _plane(words, 0, s, z, True, SCALED, DT)
        p1 = _plane(words, 1, s, z, True, SCALED, DT)
        p2 = _plane(words, 2, s, z, True, SCALED, DT)
        p3 = _plane(words, 3, s, z, True, SCALED, DT)
        p4 = _plane(words, 4, s, z, True, SCALED, DT)
        p5 = _plane(words, 5, s, z, True, SCALED, DT)
        p6 = _plane(words, 6, s, z, True, SCALED, DT)
        p7 = _plane(words, 7, s, z, True, SCALED, DT)
    # join(a, b) appends a minor axis: [.., e_in, e_mid, e_out] holds plane order
    # (P0, P2, P1, P3, P4, P6, P5, P7)[e_in + 2 e_mid + 4 e_out] at r = 4 e_in + 2 e_mid + e_out
    lo = tl.join(tl.join(p0, p2), tl.join(p1, p3))
    hi = tl.join(tl.join(p4, p6), tl.join(p5, p7))
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, KB * 16 * T))


@triton.jit
def _int4_cols(ko0, KO, T: tl.constexpr, KB: tl.constexpr, XPERM: tl.constexpr):
    """The input of each column of `_int4_step`'s tile (or, XPERM, its index in x permuted by
    `gemm_x`) and whether its k-block exists."""
    W: tl.constexpr = 2 * T
    cc = tl.arange(0, KB * 16 * T)
    if XPERM:
        k = ko0 * (16 * T) + cc
    else:
        w = cc // 8 % W
        r = cc % 8
        k = ((ko0 + cc // (16 * T)) * (16 * T) + 32 * (w % (T // 2)) + 2 * (w // (T // 2))
             + 8 * (r // 2) + r % 2)
    return k, (ko0 + cc // (16 * T)) < KO


@triton.jit
def _int8_step(q_ptr, sc_ptr, offs_n, mask_n, k0, N, K, stride_qn, G: tl.constexpr,
               BK: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, SCALED: tl.constexpr,
               ASM: tl.constexpr):
    """Inputs k0 .. k0 + BK of rows offs_n as weights [BLOCK_N, BK] in DT (SCALED; else the
    integers q), in input order: the int32 words (4 inputs) split into byte planes and
    interleaved back in registers."""
    if SCALED:
        words, s, z = _int8_tile(q_ptr, sc_ptr, offs_n, mask_n, k0 // 4, N, K // 4, stride_qn,
                                 G, BK // 4)
    else:
        words = _int8_words(q_ptr, offs_n, mask_n, k0 // 4, K // 4, stride_qn, BK // 4)[0]
        s = 0.0
        z = 0.0
    if ASM:  # the integers, two per instruction (not SCALED, float16)
        p0, p1, p2, p3 = _int8_planes_asm(words)
    else:
        p0 = _plane(words, 0, s, z, False, SCALED, DT)
        p1 = _plane(words, 1, s, z, False, SCALED, DT)
        p2 = _plane(words, 2, s, z, False, SCALED, DT)
        p3 = _plane(words, 3, s, z, False, SCALED, DT)
    # [.., e_in, e_out] holds (P0, P2, P1, P3)[e_in + 2 e_out] at byte 2 e_in + e_out
    return tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (BLOCK_N, BK))


@triton.jit
def _mac(acc, xt, w, BLOCK_M: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr):
    """acc += xt [BLOCK_M, BK] times w [BLOCK_N, BK] transposed. GEMV (BLOCK_M 1): float32
    products summed per step, acc [BLOCK_N]; else tensor cores, acc
    [BLOCK_M, BLOCK_N] or with SWAP [BLOCK_N, BLOCK_M] (w as the MMA's M side)."""
    if BLOCK_M == 1:
        out = acc + tl.sum(w * xt.to(tl.float32), axis=1)
    elif SWAP:
        if IEEE:
            out = tl.dot(w, tl.trans(xt), acc, input_precision="ieee")
        else:
            out = tl.dot(w, tl.trans(xt), acc)
    else:
        if IEEE:
            out = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
        else:
            out = tl.dot(xt, tl.trans(w), acc)
    return out


@triton.jit
def _mac_after(acc, xt, w, s, z, BLOCK_M: tl.constexpr, SWAP: tl.constexpr):
    """acc += xt times (w s + z) transposed, for integers w [BLOCK_N, BK] of one group whose
    (scale, zero) are s, z [BLOCK_N]: s (xt w.T) + z sum(xt), so the weights are never scaled
    one by one (the product of half-precision integers is exact in float32)."""
    xf = xt.to(tl.float32)
    sx = tl.sum(xf, axis=1)  # [BLOCK_M]
    if BLOCK_M == 1:
        out = acc + tl.sum(w * xf, axis=1) * s + z * sx
    elif SWAP:
        out = acc + tl.dot(w, tl.trans(xt)) * s[:, None] + z[:, None] * sx[None, :]
    else:
        out = acc + tl.dot(xt, tl.trans(w)) * s[None, :] + sx[:, None] * z[None, :]
    return out


@triton.jit
def _acc0(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr):
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    elif SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def _finish(y_ptr, ws_ptr, lock_ptr, acc, offs_m, offs_n, M, N, NW, stride_ym,
            BLOCK_M: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr):
    """Store acc as y [M, N]. Split along K: each program stores its float32 partial in the
    workspace [SPLIT, M, NW] (NW = N, or the columns of all the weights of one launch, y's
    and the workspace's pointers then at this weight's first column); the last of a tile's
    programs to count itself in (an atomic counter per tile, left at 0 again) sums the partials
    in split order and stores y: no second launch."""
    if BLOCK_M == 1:
        out = acc[None, :]
    elif SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part = ws_ptr + offs_m[:, None] * NW + offs_n[None, :]
        tl.store(part + tl.program_id(2) * M * NW, out, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the count
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        seen = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if seen == SPLIT - 1:
            total = tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
            for i in tl.static_range(1, SPLIT):
                total += tl.load(part + i * M * NW, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


# Row counts and loop bounds are not specialized on (no compile per M or shape)
@triton.jit(do_not_specialize=["M"])
def _w4_gemm(x_ptr, q_ptr, sz_ptr, y_ptr, ws_ptr, lock_ptr, M, N, KO, stride_xm, stride_ym,
             per_split, G: tl.constexpr, T: tl.constexpr, KB: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
             SWAP: tl.constexpr, XPERM: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr,
             AFTER: tl.constexpr, ASM: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    DT: tl.constexpr = tl.float32 if BLOCK_M == 1 else x_ptr.dtype.element_ty
    acc = _acc0(BLOCK_M, BLOCK_N, KB * 16 * T, SWAP)
    start = tl.program_id(2) * per_split
    # tl.range's stages pipeline the loads (cp.async) also where no tl.dot uses them (GEMV)
    for ko0 in tl.range(start, tl.minimum(start + per_split, KO), KB, num_stages=STAGES):
        w = _int4_step(q_ptr, sz_ptr, offs_n, mask_n, ko0, N, KO, G, T, KB, BLOCK_N, DT, not AFTER,
                       ASM)
        k, ok = _int4_cols(ko0, KO, T, KB, XPERM)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=mask_m[:, None] & ok[None, :], other=0.0)
        if AFTER:
            s, z = _int4_scales(sz_ptr, (ko0 * (16 * T)) // G * N + offs_n, mask_n)
            acc = _mac_after(acc, xt, w, s, z, BLOCK_M, SWAP)
        else:
            acc = _mac(acc, xt, w, BLOCK_M, SWAP, IEEE)
    _finish(y_ptr, ws_ptr, lock_ptr, acc, offs_m, offs_n, M, N, N, stride_ym, BLOCK_M, SPLIT, SWAP)


@triton.jit(do_not_specialize=["M"])  # K, per_split: divisible by 16, so the loads stay wide
def _w8_gemm(x_ptr, q_ptr, sc_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_qn,
             stride_ym, per_split, G: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr,
             STAGES: tl.constexpr, AFTER: tl.constexpr, ASM: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    DT: tl.constexpr = tl.float32 if BLOCK_M == 1 else x_ptr.dtype.element_ty
    acc = _acc0(BLOCK_M, BLOCK_N, BK, SWAP)
    start = tl.program_id(2) * per_split
    for k0 in tl.range(start, tl.minimum(start + per_split, K), BK, num_stages=STAGES):
        w = _int8_step(q_ptr, sc_ptr, offs_n, mask_n, k0, N, K, stride_qn, G, BK, BLOCK_N, DT,
                       not AFTER, ASM)
        k = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        if AFTER:
            sp = sc_ptr + ((k0 // G) * N + offs_n) * 2
            s = tl.load(sp, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(sp + 1, mask=mask_n, other=0.0).to(tl.float32)
            acc = _mac_after(acc, xt, w, s, z, BLOCK_M, SWAP)
        else:
            acc = _mac(acc, xt, w, BLOCK_M, SWAP, IEEE)
    _finish(y_ptr, ws_ptr, lock_ptr, acc, offs_m, offs_n, M, N, N, stride_ym, BLOCK_M, SPLIT, SWAP)


@triton.jit(do_not_specialize=["M"])
def _w4_planes(x_ptr, q_ptr, sz_ptr, q1, sz1, q2, sz2, y_ptr, ws_ptr, lock_ptr, M, N, N1, N2, B1,
               B2, KO, stride_xm, stride_ym, per_split, G: tl.constexpr, T: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
               SWAP: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, PARTS: tl.constexpr):
    """`_w4_planes_tile` for one weight (PARTS 1: the others' arguments unused) or for up to
    three weights that read one x, their outputs side by side in y [M, N + N1 + N2] (q, k and
    v): the programs below B1 take the first's tiles, below B2 the second's, the rest the third's."""
    pid = tl.program_id(0)
    if PARTS == 1:
        _w4_planes_tile(x_ptr, q_ptr, sz_ptr, y_ptr, ws_ptr, lock_ptr, pid, M, N, N, KO,
                        stride_xm, stride_ym, per_split, G, T, BLOCK_M, BLOCK_N, SPLIT, SWAP,
                        STAGES, ASM)
    else:
        NW = N + N1 + N2
        if pid < B1:
            _w4_planes_tile(x_ptr, q_ptr, sz_ptr, y_ptr, ws_ptr, lock_ptr, pid, M, N, NW, KO,
                            stride_xm, stride_ym, per_split, G, T, BLOCK_M, BLOCK_N, SPLIT, SWAP,
                            STAGES, ASM)
        elif pid < B2:
            _w4_planes_tile(x_ptr, q1, sz1, y_ptr + N, ws_ptr + N, lock_ptr, pid - B1, M, N1, NW,
                            KO, stride_xm, stride_ym, per_split, G, T, BLOCK_M, BLOCK_N, SPLIT,
                            SWAP, STAGES, ASM)
        else:
            _w4_planes_tile(x_ptr, q2, sz2, y_ptr + N + N1, ws_ptr + N + N1, lock_ptr, pid - B2,
                            M, N2, NW, KO, stride_xm, stride_ym, per_split, G, T, BLOCK_M,
                            BLOCK_N, SPLIT, SWAP, STAGES, ASM)


@triton.jit
def _w4_planes_tile(x_ptr, q_ptr, sz_ptr, y_ptr, ws_ptr, lock_ptr, pid_n, M, N, NW, KO,
                    stride_xm, stride_ym, per_split, G: tl.constexpr, T: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                    SWAP: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr):
    """int4, one k-block (16T inputs) a step, x in plane order (`permute_x`: plane p of k-block
    ko is x's columns ko 16T + p 2T + w, w < 2T). The stored words [BLOCK_N, 2T] are loaded once
    and each nibble plane, unpacked by elementwise ops only (or `_unpack_asm`), goes into its own
    tl.dot (K = 2T) with its x columns: no join / reshape, so the words land in the dot's
    register layout as loaded and no unpacked tile crosses shared memory (the whole tile's
    bottleneck: L1/shared at 72% against DRAM at 18%, ncu on the H200). Groups span the k-block
    (`usable`): the integers q - 8 go into the products, the group's (scale, zero) apply once per
    step, s (x w.T) + z sum(x)."""
    W: tl.constexpr = 2 * T
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    col = tl.arange(0, W)
    rowbase = (offs_n // 8) * KO * (16 * T) + (offs_n % 8) * W
    DT: tl.constexpr = x_ptr.dtype.element_ty
    if DT == tl.bfloat16:  # the bits magic | q read as DT: 128 + q (bfloat16), 1024 + q (float16)
        MAGIC: tl.constexpr = 0x4300
        SUB: tl.constexpr = 136.0
    else:
        MAGIC: tl.constexpr = 0x6400
        SUB: tl.constexpr = 1032.0
    acc = _acc0(BLOCK_M, BLOCK_N, W, SWAP)
    start = tl.program_id(2) * per_split
    for ko in tl.range(start, tl.minimum(start + per_split, KO), 1, num_stages=STAGES):
        words = tl.load(q_ptr + rowbase[:, None] + (ko * (16 * T) + col)[None, :],
                        mask=mask_n[:, None], other=0)
        t = _acc0(BLOCK_M, BLOCK_N, W, SWAP)
        sx = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if ASM:
            ps = _int4_planes_asm(words, DT)
        for p in tl.static_range(8):
            if ASM:
                w = ps[p]
            else:
                w = (((words >> (4 * p)) & 15).to(tl.int16) | MAGIC).to(DT, bitcast=True) - SUB
            xp = tl.load(x_ptr + offs_m[:, None] * stride_xm
                         + (ko * (16 * T) + p * W + col)[None, :], mask=mask_m[:, None], other=0.0)
            sx += tl.sum(xp.to(tl.float32), axis=1)
            if SWAP:
                t = tl.dot(w, tl.trans(xp), t)
            else:
                t = tl.dot(xp, tl.trans(w), t)
        s, z = _int4_scales(sz_ptr, (ko * (16 * T)) // G * N + offs_n, mask_n)
        if SWAP:
            acc += t * s[:, None] + z[:, None] * sx[None, :]
        else:
            acc += t * s[None, :] + sx[:, None] * z[None, :]
    _finish(y_ptr, ws_ptr, lock_ptr, acc, offs_m, offs_n, M, N, NW, stride_ym, BLOCK_M, SPLIT, SWAP)


@triton.jit
def _w4_dequant_rows(q_ptr, sc_ptr, out_ptr, N, pid_n, ko, KO, G: tl.constexpr, T: tl.constexpr,
                     BLOCK_N: tl.constexpr, PLANES: tl.constexpr):
    """Rows pid_n * BLOCK_N ... of one weight, k-block ko, into its [N, K] float output."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.jit(do_not_specialize=["KO"])
def _w4_dequant(q0, s0, q1, s1, q2, s2, out_ptr, N0, N1, N2, B1, B2, KO, G: tl.constexpr,
                T: tl.constexpr, BLOCK_N: tl.constexpr, PLANES: tl.constexpr):
    """Up to three weights of one K (q, k and v; gate and up) one after another into out: the
    programs below B1 do the first's rows, below B2 the second's, the rest the third's."""
    pid = tl.program_id(0)
    ko = tl.program_id(1)
    if pid < B1:
        _w4_dequant_rows(q0, s0, out_ptr, N0, pid, ko, KO, G, T, BLOCK_N, PLANES)
    elif pid < B2:
        _w4_dequant_rows(q1, s1, out_ptr + N0 * (KO * 16 * T), N1, pid - B1, ko, KO, G, T,
                         BLOCK_N, PLANES)
    else:
        _w4_dequant_rows(q2, s2, out_ptr + (N0 + N1) * (KO * 16 * T), N2, pid - B2, ko, KO, G, T,
                         BLOCK_N, PLANES)


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


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host: triton.cdiv is a constexpr function, 2 us a call from Python
    (Triton 3.5, this repository's 2-vCPU VM) against 0.03, and a dequantization or GEMM launch
    asked it three to six times."""
    return -(-a // b)


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


# split-K tile counters per device: SPLIT_K_COUNTERS int32, zero between launches
_locks: dict[torch.device, torch.Tensor] = {}


def lock_buffer(device: torch.device) -> torch.Tensor:
    """The zeroed split-K counters of `device` (made eagerly, before any graph capture: one per
    device for good, so a captured graph's address stays valid; launches on one stream in order
    share it, each leaving its counters at 0)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _locks.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("quantized matmul: the split-K counters are made inside a CUDA "
                               "graph capture; run a matmul eagerly first")
        buf = _locks[device] = torch.zeros(SPLIT_K_COUNTERS, dtype=torch.int32, device=device)
    return buf


_sms: dict[torch.device, int] = {}
# the last x put in plane order and its copy: q, k and v (gate and up) read one activation, and
# the copy costs 2.3-3.7 us a matmul at 1-64 rows on the H200, a tenth of the planes tile's time
_last_x: list = [(None, -1, None, False, None)]  # (x, its version, (qtype, K), in a capture, the copy)


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of `device` (auto_split); off CUDA (Triton's interpreter) the H200's 132."""
    if device not in _sms:
        _sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 132)
    return _sms[device]


def planes_x(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """permute_x(x, w), made once for consecutive matmuls of one x (the same tensor, unchanged
    since: its version counter, which views share) against weights of one qtype and K (the orders
    of int4 and int8 differ: a GGUF Q4_K_M block keeps q as int4 and v as int8). Inside a graph
    capture the copy is a node of the graph, and later matmuls of the same x read it there; a
    copy made outside the capture is never used inside it (the replay would read it stale).
    Holding x keeps its identity from being reused; what the version cannot see is a graph
    replay writing into x, so x must not be a graph's static buffer: the models multiply only
    activations made in the same forward (a norm's or attention's output)."""
    last, version, order, in_graph, xk = _last_x[0]
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if last is x and version == x._version and order == (w.qtype, w.shape[1]) and in_graph == capturing:
        return xk
    xk = permute_x(x, w)
    _last_x[0] = (x, x._version, (w.qtype, w.shape[1]), capturing, xk)
    return xk


def remember_planes(x: torch.Tensor, w: QuantWeight, xk: torch.Tensor) -> None:
    """Make xk, equal to permute_x(x, w) and written by the kernel that made x (a fused norm or
    activation, gdsllm.models.fused), the copy planes_x returns for x: no copy launch of its own."""
    _last_x[0] = (x, x._version, (w.qtype, w.shape[1]),
                  x.is_cuda and torch.cuda.is_current_stream_capturing(), xk)


def gemm_x(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [M, K] in the column order of the int4 GEMM's tile (`Config.xperm`): per k-block of
    16T inputs, word w = c T/2 + jw then r = 2 i + odd, input 32 jw + 8 i + 2 c + odd."""
    m = x.shape[0]
    t = inner_k_tiles(k)  # [m, ko, jw, i, c, odd] -> [m, ko, c, jw, i, odd]
    return x.reshape(m, k // (16 * t), t // 2, 4, 4, 2).permute(0, 1, 4, 2, 3, 5).reshape(m, k)


def one_layout(ws: tuple[QuantWeight, ...]) -> bool:
    """Whether weights share qtype, K and group size: what one launch over all of them needs
    (matmul's planes tile, dequantize_into)."""
    w = ws[0]
    return all((v.qtype, v.shape[1], v.group_size) == (w.qtype, w.shape[1], w.group_size) for v in ws)


def _layouts(ws: tuple[QuantWeight, ...]) -> str:
    return ", ".join(f"{v.qtype} {tuple(v.shape)} g{v.group_size}" for v in ws)


def matmul(x: torch.Tensor, w: QuantWeight | tuple[QuantWeight, ...],
           cfg: Config = Config()) -> torch.Tensor:
    """x @ W.T for a 2-D x on W's device (any M; a tile `usable` for W and x), reading W as
    stored. With the planes tile, W may be up to three int4 weights of one K and group size
    that read this x (q, k and v): one launch, y [M, sum of their N] their outputs side by side."""
    parts = w if isinstance(w, tuple) else (w,)
    w = parts[0]
    if len(parts) > 1 and (not cfg.planes or len(parts) > 3 or not one_layout(parts)):
        raise ValueError(f"matmul: {len(parts)} weights in one launch need the planes tile, at most "
                         f"three, of one qtype, K and group size: {_layouts(parts)}")
    n, k = sum(v.shape[0] for v in parts), w.shape[1]
    m = x.shape[0]
    assert usable(w.qtype, k, cfg, w.group_size, x.dtype), (w.qtype, k, w.group_size, x.dtype, cfg)
    if w.qtype == "int4":
        t = inner_k_tiles(k)
        unit, steps = 1 if cfg.planes else max(1, cfg.block_k // (16 * t)), k // (16 * t)  # k-blocks
    else:
        unit, steps = cfg.block_k, k  # in inputs
    tiles = [_cdiv(v.shape[0], cfg.block_n) for v in parts]
    grid = [sum(tiles), _cdiv(m, cfg.block_m), 1]
    want = cfg.split_k or auto_split(grid[0] * grid[1], _sm_count(x.device))
    split = max(1, min(want, _cdiv(steps, unit)))
    if grid[0] * grid[1] > SPLIT_K_COUNTERS or split * m * n >= 2 ** 31:
        split = 1
    per_split = _cdiv(_cdiv(steps, split), unit) * unit
    grid[2] = split = _cdiv(steps, per_split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if split > 1:
        ws, locks = torch.empty(split, m, n, dtype=torch.float32, device=x.device), lock_buffer(x.device)
    else:
        ws = locks = y  # unused
    ieee = x.dtype == torch.float32
    step = unit * 16 * t if w.qtype == "int4" else unit  # inputs per step
    # half precision and a group spanning each step: integers into the product, scaled after
    after = cfg.after and not ieee and w.group_size % step == 0
    # and where they enter the product in half precision, unpacked two per instruction (PTX; not
    # under Triton's interpreter, which runs no assembly); int8 in float16 only (bfloat16 holds
    # no 1024 + byte exactly)
    asm = (after and cfg.asm and cfg.block_m > 1 and not INTERPRETED
           and (w.qtype == "int4" or x.dtype == torch.float16))
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=split, SWAP=cfg.swap, IEEE=ieee,
                  STAGES=cfg.stages, AFTER=after, ASM=asm, num_warps=cfg.warps,
                  num_stages=cfg.stages)
    if cfg.planes:
        xk = planes_x(x, w)
        p = list(parts) + [w] * (3 - len(parts))  # absent parts: no program reaches them
        rows, b = [v.shape[0] for v in parts] + [0] * (3 - len(parts)), tiles + [0] * (3 - len(parts))
        _w4_planes[tuple(grid)](xk, p[0].data, p[0].scales.view(torch.int32), p[1].data,
                                p[1].scales.view(torch.int32), p[2].data,
                                p[2].scales.view(torch.int32), y, ws, locks, m, rows[0], rows[1],
                                rows[2], b[0], b[0] + b[1], steps, xk.stride(0), y.stride(0),
                                per_split, G=w.group_size, T=t, BLOCK_M=cfg.block_m,
                                BLOCK_N=cfg.block_n, SPLIT=split, SWAP=cfg.swap, STAGES=cfg.stages,
                                ASM=cfg.asm and not INTERPRETED, PARTS=len(parts),
                                num_warps=cfg.warps, num_stages=cfg.stages)
    elif w.qtype == "int4":
        xk = gemm_x(x, k) if cfg.xperm else x.contiguous()
        _w4_gemm[tuple(grid)](xk, w.data, w.scales.view(torch.int32), y, ws, locks, m, n, steps,
                              xk.stride(0), y.stride(0), per_split, G=w.group_size, T=t, KB=unit,
                              XPERM=cfg.xperm, **common)
    else:
        x, q = x.contiguous(), _words8(w)
        _w8_gemm[tuple(grid)](x, q, w.scales, y, ws, locks, m, n, k, x.stride(0), q.stride(0),
                              y.stride(0), per_split, G=w.group_size, BK=unit, **common)
    return y


def dequantize_into(w: QuantWeight | tuple[QuantWeight, ...], out: torch.Tensor,
                    planes: bool = False, block_n: int | None = None) -> torch.Tensor:
    """Write the float weight [N, K] into `out` (contiguous, numel N*K, any float dtype): in
    input order, or with `planes` in the order of `permute_x` (contiguous stores, so quicker;
    then F.linear(permute_x(x, w), out) is x @ W.T). Rows per program: int4 16 (the H200,
    2026-12-04, benchmarks/probe_w4_tiles.py, the LLaMA-7B shapes in planes: 11.3 / 32.8 / 32.7
    us against 12.5 / 33.6 / 33.6 with 32, 13.7 / 38.2 / 37.7 with 64), int8 32.

    A tuple of weights of one qtype, K and group size (q, k and v): their rows one after another,
    [sum of N, K], as one weight of those rows would be; int4 in one launch for up to three."""
    ws = w if isinstance(w, tuple) else (w,)
    qtype, k, group = ws[0].qtype, ws[0].shape[1], ws[0].group_size
    if not one_layout(ws):
        raise ValueError(f"dequantize_into: the weights differ in qtype, K or group size: {_layouts(ws)}")
    n = sum(v.shape[0] for v in ws)
    block_n = block_n or (16 if qtype == "int4" else 32)
    assert out.is_contiguous() and out.numel() == n * k, (tuple(out.shape), [v.shape for v in ws])
    if qtype == "int4" and len(ws) <= 3:
        t = inner_k_tiles(k)
        p = list(ws) + [ws[0]] * (3 - len(ws))  # absent parts: no program reaches them
        b = [_cdiv(v.shape[0], block_n) for v in ws] + [0] * (3 - len(ws))
        _w4_dequant[(sum(b), k // (16 * t))](
            p[0].data, p[0].scales, p[1].data, p[1].scales, p[2].data, p[2].scales, out,
            p[0].shape[0], p[1].shape[0], p[2].shape[0], b[0], b[0] + b[1], k // (16 * t),
            G=group, T=t, BLOCK_N=block_n, PLANES=planes)
        return out.view(n, k)
    start = 0
    for v in ws:
        rows = v.shape[0]
        part = out[start * k:(start + rows) * k]
        if qtype == "int4":
            dequantize_into(v, part, planes, block_n)
        else:
            q, bw = _words8(v), min(32, max(16, group // 4))  # one group a step from 64
            _w8_dequant[(_cdiv(rows, block_n), _cdiv(k // 4, bw))](
                q, v.scales, part, rows, k // 4, q.stride(0), G=group, BLOCK_W=bw,
                BLOCK_N=block_n, PLANES=planes)
        start += rows
    return out.view(n, k)
