"""CUDA kernels for quantized weights, reading the packed bytes where they landed (a VRAM slot).

    y = linear(qw, x)      # x [T, K] (float16 / bfloat16 / float32) -> [T, N] in x's dtype

Per row count T (decode batches, draft verification, prefill chunks):
- T <= KERNEL_MAX_ROWS: the Triton W4A16 / W8A16 GEMM of `gdsllm.quant.triton_gemm`, which
  unpacks the stored words in registers (no copy of the weight), with the tile sizes of
  `CONFIGS` for that T. Where `INT4PACK_ROWS` says so, int4 goes to torch's tinygemm
  `_weight_int4pack_mm` instead (the same stored layout; its layout is probed once first).
- Above: the weight is dequantized into ONE preallocated scratch buffer per device and dtype
  (`scratch`, sized to the largest weight seen, so no allocation once warm) and multiplied with
  cuBLAS; at those T the matmul's arithmetic, not the weight's bytes, sets the time.

Nothing here touches the host inside a captured CUDA graph: no host tensor, no `.item()`; the
only allocation is the output (from the graph's pool), the scratch never grows during a capture.

Measured: see MEASURED below and docs/BENCHMARKS.md (benchmarks/bench_kernels.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import FormatError
from gdsllm.quant.schemes import QuantWeight

MEASURED = """not yet measured"""

KERNEL_MAX_ROWS = {"int4": 256, "int8": 256}
INT4PACK_ROWS: tuple[int, int] = (0, 0)  # an inclusive range of T where tinygemm wins; (0, 0): none
# (largest T, block_m, block_n, warps, stages, split_k), by T ascending: the first with T >= rows
CONFIGS = {
    "int4": ((16, 16, 32, 4, 3, 1), (32, 32, 64, 4, 3, 1), (64, 64, 64, 4, 3, 1),
             (256, 128, 128, 8, 3, 1)),
    "int8": ((16, 16, 32, 4, 3, 1), (32, 32, 64, 4, 3, 1), (64, 64, 64, 4, 3, 1),
             (256, 128, 128, 8, 3, 1)),
}

_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def check_int4_layout() -> None:
    """FormatError if this torch does not pack int4 in the layout GdsLLM models are written in."""
    from gdsllm.quant.int4pack import INT4_LAYOUT, probe_torch_layout
    why = probe_torch_layout("cuda")
    if why is not None:
        raise FormatError(f"this model stores int4 weights in the {INT4_LAYOUT} layout, and {why}; "
                          f"run it on the CPU, or convert it with --quant int8 or --quant none")


def config(qtype: str, rows: int):
    from gdsllm.quant.triton_gemm import Config
    for top, *c in CONFIGS[qtype]:
        if rows <= top:
            return Config(*c)
    raise ValueError(f"no {qtype} kernel configuration for {rows} rows")


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A buffer of at least `numel` elements, reused by every weight of this device and dtype
    (kernels on one stream run in order, so one weight's use ends before the next is written)."""
    key = (device, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"quantized matmul: the dequantization scratch must grow to {numel} "
                               f"elements inside a CUDA graph capture; run the shape eagerly first")
        _scratch.pop(key, None)  # free the old buffer before taking the larger one
        buf = torch.empty(numel, dtype=dtype, device=device)
        _scratch[key] = buf
    return buf[:numel]


def linear(w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    from gdsllm.quant import triton_gemm
    rows = x.shape[0]
    if rows == 0:
        return x.new_empty(0, w.shape[0])
    if w.qtype == "int4" and INT4PACK_ROWS[0] <= rows <= INT4PACK_ROWS[1]:
        check_int4_layout()
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), w.data,
                                               w.group_size, w.scales)
        return y.to(x.dtype)
    if rows <= KERNEL_MAX_ROWS[w.qtype]:
        return triton_gemm.matmul(x, w, config(w.qtype, rows))
    n, k = w.shape
    return F.linear(x, triton_gemm.dequantize_into(w, scratch(x.device, x.dtype, n * k)))
