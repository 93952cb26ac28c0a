"""How a quantized tensor is laid out in a unit file and described in metadata.json.

    {"name": "mlp.up_proj.weight", "dtype": "int4", "shape": [1536, 576], "offset": 8192,
     "nbytes": 442368, "quant": {"qtype": "int4", "group_size": 32, "layout": "tinygemm-int32",
                                 "scales_offset": 450560, "scales_nbytes": 110592}}

A quantized weight of logical shape [N, K] (out, in) is stored as its packed values
(`data_shape`: int8 row-major, or int4 in the int32 tile layout of torch's
`_convert_weight_to_int4pack`) and a companion (scale, zero) tensor [K / group_size, N, 2] at
`scales_offset` in the same unit file, both 4 KiB aligned and inside the unit's checksum. What the
values mean and how they are computed with is gdsllm.quant.schemes; this module is only the
format's side: the qtypes, layouts and group sizes a file may hold and their byte sizes
(gdsllm.format.metadata checks each entry against them). It needs no torch.
"""
from __future__ import annotations

QTYPES = ("int4", "int8")
INT4_LAYOUT = "tinygemm-int32"  # the only int4 layout this GdsLLM writes and reads
LAYOUTS = {"int4": (INT4_LAYOUT,), "int8": ("rowmajor-int8",)}
SCALE_DTYPE_NAME = {"int4": "bfloat16", "int8": "float16"}
GROUP_SIZES = {"int4": (32, 64, 128, 256), "int8": (16, 32, 64, 128, 256)}  # 16: GGUF Q6_K


def inner_k_tiles(k: int) -> int:
    """Inner k-tiles of the int4 tile layout for an input dimension k: the largest of 8, 4, 2
    with k a multiple of 16 * tiles (the kernel's widest loads where the shape allows)."""
    for t in (8, 4, 2):
        if k % (16 * t) == 0:
            return t
    raise ValueError(f"int4 needs an input dimension that is a multiple of 32, got {k}")


def check_shape(qtype: str, shape: tuple[int, ...], group_size: int, where: str) -> None:
    """ValueError naming `where` if `shape` cannot be quantized as `qtype` in groups of that size."""
    if qtype not in QTYPES:
        raise ValueError(f"{where}: unknown qtype {qtype!r} (this GdsLLM knows {', '.join(QTYPES)})")
    if len(shape) != 2:
        raise ValueError(f"{where}: only 2-D weights are quantized, got shape {tuple(shape)}")
    n, k = shape
    if group_size not in GROUP_SIZES[qtype]:
        raise ValueError(f"{where}: {qtype} group size must be one of {GROUP_SIZES[qtype]}, "
                         f"got {group_size}")
    if k % group_size:
        raise ValueError(f"{where}: group size {group_size} does not divide the input dimension "
                         f"{k} of shape {tuple(shape)}; pick a --group-size that does")
    if qtype == "int4" and n % 8:
        raise ValueError(f"{where}: int4 needs an output dimension that is a multiple of 8, got {n}")


def data_shape(qtype: str, shape: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the stored quantized values of a [N, K] weight (dtype DATA_DTYPE[qtype])."""
    n, k = shape
    if qtype == "int8":
        return (n, k)
    t = inner_k_tiles(k)
    return (n // 8, k // (16 * t), 32, t // 2)


def scales_shape(shape: tuple[int, int], group_size: int) -> tuple[int, int, int]:
    n, k = shape
    return (k // group_size, n, 2)


def data_nbytes(qtype: str, shape: tuple[int, int]) -> int:
    n, k = shape
    return n * k // 2 if qtype == "int4" else n * k


def scales_nbytes(qtype: str, shape: tuple[int, int], group_size: int) -> int:
    n, k = shape
    return (k // group_size) * n * 2 * 2  # two 2-byte floats per group and row
