"""The int4 tile layout of torch's `_convert_weight_to_int4pack` (tinygemm), in plain torch ops.

For a weight [N, K] of 4-bit values q, torch (2.5 and later, CUDA) packs the bytes
`(q[:, 2i] << 4) | q[:, 2i + 1]` into int32 words of shape [N/8, K/(16*t), 32, t/2] (t: inner
k-tiles, 2, 4 or 8), the B operand of an m16n8k16 tensor-core tile: lane `l` of a warp holds row
n = 8*tile + l // 4 and, for each pair of k-tiles, the bytes l%4, l%4+4, l%4+8, l%4+12 of that
pair's 16 bytes, their high nibbles in the word's low 16 bits, their low nibbles above.

The layout is deterministic, so the converter writes it (on a machine without a GPU) and CUDA
hands the streamed bytes to `_weight_int4pack_mm` as they landed. `probe_torch_layout()` checks,
once per process on CUDA, that this torch still packs that way: a model written in a layout the
running torch does not produce is refused, never computed with wrong numbers.

    data = pack_int4(q)                  # q: uint8 [N, K] in 0..15 -> int32 tiles
    assert torch.equal(unpack_int4(data, q.shape), q)
"""
from __future__ import annotations

import functools

import torch

from gdsllm.quant.schemes import INT4_LAYOUT, inner_k_tiles


def _tiles(n: int, k: int) -> tuple[int, int, int]:
    assert n % 8 == 0, n
    t = inner_k_tiles(k)
    return n // 8, k // (16 * t), t


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values in 0..15 -> int32 [N/8, K/(16t), 32, t/2] (any device)."""
    n, k = q.shape
    nt, ko, t = _tiles(n, k)
    # k = 2 * (ko*8t + 16j + 4i + c) + odd; lane = 4r + c; nibble p of the word = 4 * odd + i
    nib = q.reshape(nt, 8, ko, t // 2, 4, 4, 2).permute(0, 2, 1, 5, 3, 6, 4)
    nib = nib.reshape(nt, ko, 32, t // 2, 4, 2)  # nibbles 2b, 2b + 1 make byte b of the word
    byte = (nib[..., 0] | (nib[..., 1] << 4)).contiguous()  # little-endian: byte 0 is the lowest
    return byte.view(torch.int32).reshape(nt, ko, 32, t // 2).contiguous()


def unpack_int4(data: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of `pack_int4`: int32 tiles -> uint8 [N, K] (any device)."""
    n, k = shape
    nt, ko, t = _tiles(n, k)
    assert tuple(data.shape) == (nt, ko, 32, t // 2), (tuple(data.shape), shape)
    return _nibbles(data).view(nt, ko, 8, 4, t // 2, 2, 4).permute(0, 2, 1, 4, 6, 3, 5).reshape(n, k)


def unpack_int4_rows(data: torch.Tensor, shape: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
    """uint8 [len(rows), K]: only the given rows of `unpack_int4(data, shape)` (rows: int64 on
    data's device), reading 8t words per row per k-block; no host tensor, nothing of size N x K."""
    n, k = shape
    nt, ko, t = _tiles(n, k)
    lanes = data.view(nt, ko, 8, 4 * (t // 2))  # a row's words: tile n // 8, lanes 4 (n % 8) ..
    words = lanes[rows // 8, :, rows % 8]  # [R, ko, 4 * t/2]
    r = rows.shape[0]
    return _nibbles(words.view(r, ko, 4, t // 2)).view(r, ko, 4, t // 2, 2, 4).permute(
        0, 1, 3, 5, 2, 4).reshape(r, k)


def _nibbles(data: torch.Tensor) -> torch.Tensor:
    """[..., 8] uint8: nibble p of each int32 word, p = 4 * (odd k) + i of byte v_i (lane = 4 r + c,
    k = 2 * (ko*8t + 16j + 4i + c) + odd). Nibble p is the low (p even) or high (p odd) half of the
    word's byte p // 2 (little endian): the bytes are split, a quarter of the work of shifting
    int32 words eight times (measured on the CPU), with no host tensor (capture-safe)."""
    b = data.contiguous().view(torch.uint8).view(*data.shape, 4)
    return torch.stack((b & 15, b >> 4), dim=-1).view(*data.shape, 8)


@functools.lru_cache(maxsize=None)
def probe_torch_layout(device: str = "cuda") -> str | None:
    """None if this torch's `_convert_weight_to_int4pack` on `device` packs exactly as
    `pack_int4` (every inner k-tiles value); otherwise why not, in words."""
    g = torch.Generator().manual_seed(0)
    for k in (64, 128, 256):  # inner k-tiles 2, 4, 8
        q = torch.randint(0, 16, (16, k), dtype=torch.uint8, generator=g)
        ours = pack_int4(q)
        try:
            packed = (q[:, 0::2] << 4 | q[:, 1::2]).to(device)
            theirs = torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles(k)).cpu()
        except Exception as e:  # an older torch (int32 input) or a build without the op
            return f"torch {torch.__version__} cannot pack int4 on {device}: {e}".splitlines()[0]
        if theirs.shape != ours.shape or not torch.equal(theirs, ours):
            return (f"torch {torch.__version__} packs int4 differently from the {INT4_LAYOUT} "
                    f"layout this model was written in")
    return None
