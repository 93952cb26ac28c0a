"""CPU kernel for quantized weights that are not held as float copies: dequantize, then one
float matmul (prompts and single tokens alike run as one matrix-matrix product).

    y = linear(qw, x)      # x [T, K] float32 -> [T, N]

Resident units do not come here: the runner keeps them as float copies made once
(gdsllm.engine.host_copies.HostCopies), within a memory budget. This path serves what is streamed, and
resident units beyond that budget. Measured on the 2-core development machine (2026-12-03, torch
2.13 CPU, AVX-512; SmolLM2-135M shapes, one block's seven projections, groups of 32, the three
candidates side by side in one process, three repeats, other jobs sharing the cores):

    candidate                                       1 token       256 tokens
    float copy made once + F.linear                 0.3-0.5 ms    18-21 ms
    _weight_int4pack_mm_for_cpu (repacked once)     4.7-5.9 ms    1,040-1,560 ms
    dequantize per call (this function)             23-28 ms      32-47 ms
    int8: _weight_int8pack_mm (per-channel only)    17-26 ms      990-1,480 ms

torch's packed kernels lose to dequantizing at prompt sizes, and `_weight_int8pack_mm` takes one
scale per row, not the groups (scale, zero) these weights have, so it is no candidate for them.
A streamed unit would need its repack on every load, the cost of a dequantize. Hence: float
copies where memory allows, otherwise one temporary float copy of ONE weight, freed after its
matmul (QuantWeight.dequantize runs in place on it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdsllm.quant.schemes import QuantWeight


def linear(w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.dequantize(x.dtype))
