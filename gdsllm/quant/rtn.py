"""Group-wise asymmetric round-to-nearest: a float weight into an int4 or int8 QTensor.

Per group of `group_size` consecutive inputs of a row, the range [min, max] is split into 15
(int4) or 255 (int8) equal steps: s = (max - min) / steps, z = the value of the middle code
(int4: q = 8; int8: q = 0). s and z are rounded to the dtype they are stored in FIRST and q is
chosen against the rounded pair, so what is stored is the nearest code to each weight under the
scales the kernels will actually use.

    qt = quantize(w, "int4", group_size=64, where="block.3 mlp.up_proj.weight")

HQQ-style refinement is not applied: plain RTN is what is measured in tests/test_quant.py.
"""
from __future__ import annotations

import torch

from gdsllm.quant.schemes import SCALE_DTYPE, QTensor, check_shape

STEPS = {"int4": 15, "int8": 255}


def quantize(w: torch.Tensor, qtype: str, group_size: int, where: str = "weight") -> QTensor:
    """RTN-quantize the float weight `w` [N, K]; ValueError naming `where` on a bad shape."""
    check_shape(qtype, tuple(w.shape), group_size, where)
    n, k = w.shape
    g = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    steps = STEPS[qtype]
    sd = SCALE_DTYPE[qtype]
    s = ((hi - lo) / steps).to(sd).float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: any scale, q lands on z
    mid = 8 if qtype == "int4" else 128
    z = (lo + mid * s).to(sd).float()
    q = torch.round((g - z[..., None]) / s[..., None])  # relative to the middle code
    if qtype == "int4":
        q = (q + 8).clamp(0, 15).to(torch.uint8)
    else:
        q = q.clamp(-128, 127).to(torch.int8)
    return QTensor(qtype, q.reshape(n, k), s, z, group_size)
