"""CUDA kernels for quantized weights, reading the packed bytes where they landed (a VRAM slot).

    y = linear(qw, x)      # x [T, K] (float16 / bfloat16) -> [T, N] in x's dtype

- int4: `torch.ops.aten._weight_int4pack_mm` over the stored int32 tile layout and the stored
  bfloat16 (scale, zero) pairs: no repack, no copy of the weight. Activations are cast to
  bfloat16 (the kernel's only input dtype) and the result back. Measured on an H200 (torch 2.11,
  batch 1, DESIGN.md): 15.7 us for 4096x11008 against 24.7 us in bf16; at batch 8 slower than bf16
  (33 against 25 us). Before the first int4 matmul of a process, `probe_torch_layout` checks that
  this torch packs int4 as the model was written; if not, FormatError, never wrong numbers.
- int8: a small Triton GEMV (`triton_int8`), since `torch._weight_int8pack_mm` measured 254 us
  there, ten times bf16.
- Above a row count the weight is instead dequantized (one temporary float copy of ONE weight)
  and multiplied with cuBLAS. The thresholds below are NOT YET MEASURED: the figures above say
  only that int4pack_mm wins at 1 row and loses at 8; benchmarks/bench_quant.py is where to
  settle both per batch size on the GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import FormatError
from gdsllm.quant.schemes import QuantWeight

INT4_MM_MAX_ROWS = 4    # not yet measured (see the module docstring)
INT8_GEMV_MAX_ROWS = 4  # not yet measured


def check_int4_layout() -> None:
    """FormatError if this torch does not pack int4 in the layout GdsLLM models are written in."""
    from gdsllm.quant.int4pack import INT4_LAYOUT, probe_torch_layout
    why = probe_torch_layout("cuda")
    if why is not None:
        raise FormatError(f"this model stores int4 weights in the {INT4_LAYOUT} layout, and {why}; "
                          f"run it on the CPU, or convert it with --quant int8 or --quant none")


def linear(w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[0]
    if w.qtype == "int4":
        check_int4_layout()
        if rows <= INT4_MM_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), w.data,
                                                   w.group_size, w.scales)
            return y.to(x.dtype)
    elif rows <= INT8_GEMV_MAX_ROWS:
        from gdsllm.quant.triton_int8 import int8_gemv
        return int8_gemv(x, w)
    return F.linear(x, w.dequantize(x.dtype))
