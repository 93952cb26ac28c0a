"""GGUF quantized blocks decoded into the int4 / int8 group layout, values kept as they are.

Each llama.cpp block type is read straight from the memory-mapped bytes into integer values q and
per-group (scale, zero), with no float copy of the weight: Q4_0, Q4_1 and Q4_K become int4
(w = (q - 8) * s + z, groups of 32); Q5_0, Q5_1, Q5_K, Q8_0 (groups of 32) and Q6_K (groups of
16) become int8 (w = q * s + z). The formulas mirror `gguf.quants` (tests compare both).

    qt = decode(tensor.tensor_type.name, tensor.data, (n, k))   # a QTensor, or None for a float

Scales go through float32 here and are rounded to the stored scale dtype by the writer: exact for
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 scales (float16) as int8, within bfloat16 rounding as int4.
"""
from __future__ import annotations

import numpy as np
import torch

from gdsllm.quant.schemes import QTensor

FLOAT_TYPES = ("F32", "F16", "BF16")
NATIVE = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q5_0": "int8", "Q5_1": "int8",
          "Q5_K": "int8", "Q6_K": "int8", "Q8_0": "int8"}
QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """[nb, ..., width] bytes -> [nb, ..., 2*width]: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:], 16), d, np.zeros_like(d), 32


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:], 16), d, m + 8 * d, 32


def _q5_bits(qh: np.ndarray, ql: np.ndarray) -> np.ndarray:
    h = np.ascontiguousarray(qh).view(np.uint32) >> np.arange(32, dtype=np.uint32)
    return _nibbles(ql, 16) | ((h & 1).astype(np.uint8) << 4)


def _q5_0(b):
    d = _f16(b[:, :2])
    return _q5_bits(b[:, 2:6], b[:, 6:]).astype(np.int16) - 16, d, np.zeros_like(d), 32


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _q5_bits(b[:, 4:8], b[:, 8:]).astype(np.int16), d, m, 32


def _q8_0(b):
    d = _f16(b[:, :2])
    return np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.int16), d, np.zeros_like(d), 32


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b):
    nb = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 16:].reshape(nb, 4, 32), 32).reshape(nb, QK_K)  # 64-value chunks: lo, hi
    s = d * sc
    return q, s, 8 * s - dmin * mn, 32


def _q5_k(b):
    nb = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh, ql = b[:, 16:48], b[:, 48:]
    lo = _nibbles(ql.reshape(nb, 4, 32), 32).reshape(nb, 8, 32)
    hi = (qh.reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (lo | (hi << 4)).reshape(nb, QK_K).astype(np.int16)
    return q, d * sc, -dmin * mn, 32


def _q6_k(b):
    nb = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    lo = (ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    lo = lo.reshape(nb, 8, 32)
    hi = (qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    hi = hi.reshape(nb, 8, 32)
    q = (lo | (hi << 4)).reshape(nb, QK_K).astype(np.int16) - 32
    s = d * np.ascontiguousarray(scales).view(np.int8).astype(np.float32)
    return q, s, np.zeros_like(s), 16


DECODERS = {"Q4_0": (_q4_0, 32, 18), "Q4_1": (_q4_1, 32, 20), "Q5_0": (_q5_0, 32, 22),
            "Q5_1": (_q5_1, 32, 24), "Q8_0": (_q8_0, 32, 34), "Q4_K": (_q4_k, QK_K, 144),
            "Q5_K": (_q5_k, QK_K, 176), "Q6_K": (_q6_k, QK_K, 210)}


def decode(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> QTensor:
    """The QTensor of a GGUF tensor of block type `type_name` ([N, K] row-major, blocks along K)."""
    fn, block, size = DECODERS[type_name]
    n, k = shape
    if k % block:
        raise ValueError(f"{type_name}: row length {k} is not a multiple of its block size {block}")
    b = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, size)
    if b.shape[0] * block != n * k:
        raise ValueError(f"{type_name}: {b.shape[0]} blocks of {block} values, shape {shape} "
                         f"needs {n * k // block}")
    q, s, z, g = fn(b)
    s = np.broadcast_to(s, (b.shape[0], block // g)) if s.shape[-1] == 1 else s
    z = np.broadcast_to(z, (b.shape[0], block // g)) if z.shape[-1] == 1 else z
    qtype = NATIVE[type_name]
    qt = torch.from_numpy(np.ascontiguousarray(q.reshape(n, k)))
    qt = qt.to(torch.uint8) if qtype == "int4" else qt.to(torch.int8)
    return QTensor(qtype, qt, torch.from_numpy(np.array(s, dtype=np.float32).reshape(n, k // g)),
                   torch.from_numpy(np.array(z, dtype=np.float32).reshape(n, k // g)), g)


def check_keepable(path, name: str, type_name: str) -> None:
    """FormatError unless the GGUF tensor `name` of `type_name` has an int4/int8 (or float) mapping."""
    from gdsllm.format.metadata import FormatError
    if type_name not in FLOAT_TYPES and type_name not in NATIVE:
        raise FormatError(f"{path}: tensor {name} has type {type_name}, which has no int4/int8 "
                          f"mapping (kept quantized: {', '.join(NATIVE)}); convert with "
                          f"--quant none to dequantize it to --dtype")


def decode_named(path, name: str, tensor, shape: tuple[int, int]) -> QTensor:
    """`decode` of the GGUF reader tensor `tensor`, errors naming the file and tensor."""
    from gdsllm.format.metadata import FormatError
    if len(shape) != 2:
        raise FormatError(f"{path}: tensor {name} is quantized but has shape {shape}")
    try:
        return decode(tensor.tensor_type.name, tensor.data, shape)
    except ValueError as e:
        raise FormatError(f"{path}: tensor {name}: {e}") from None
