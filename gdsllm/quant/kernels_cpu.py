"""CPU kernels for quantized weights: dequantize per matmul, then one float matmul.

    y = linear(qw, x)      # x [T, K] float32 -> [T, N]

Measured on this development machine (2 shared cores, torch 2.13 CPU, SmolLM2 shapes 1536x576 and
576x1536, groups of 32): `torch.ops.aten._weight_int4pack_mm_for_cpu` (after unpacking the tile
layout and `_convert_weight_to_int4pack_for_cpu`) took 2.3-3.1 s for 512 rows against 0.08-0.13 s
for dequantize + `F.linear`, and 32-270 ms against 41-180 ms for one row (the machine was loaded;
the ratio at 512 rows held across runs). Prompt-sized batches dominate CPU use (tests, perplexity),
so the CPU path dequantizes: a float copy of ONE weight, freed after its matmul, never of a unit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdsllm.quant.schemes import QuantWeight


def linear(w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.dequantize(x.dtype))
