"""Which tensors are quantized, and to what: the one rule the writer applies.

    value = prepare("mlp.up_proj.weight", w, quant="int4", group_size=64, where="block.3")

- The projections of every decoder block (`*_proj.weight`) take the requested qtype.
- The embedding and the LM head take int8 even under `--quant int4`: the head is the matrix whose
  errors reach the logits directly (llama.cpp's 4-bit types keep `output.weight` at 6 bits or
  more for the same reason), and the embedding is only gathered (a few rows per token), so its
  4 bits would save storage and nothing in compute. int8 still halves both against float16.
- Norms stay float (tiny, and they scale every activation).
- A tensor that is already quantized (a GGUF block type) stays as it is under `quant=None`; when
  a qtype is requested, int4 -> int8 is exact (q - 8), int8 -> int4 goes through RTN.
"""
from __future__ import annotations

import torch

from gdsllm.quant.rtn import quantize
from gdsllm.quant.schemes import QTensor

QUANT_CHOICES = ("none", "int8", "int4")
WIDE = ("embed_tokens.weight", "lm_head.weight")


def target_qtype(name: str, quant: str | None) -> str | None:
    """The qtype `name` is stored in under `--quant quant` (None: stays float)."""
    if quant in (None, "none"):
        return None
    if quant not in QUANT_CHOICES:
        raise ValueError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
    if name in WIDE:
        return "int8"
    return quant if name.endswith("_proj.weight") else None


def prepare(name: str, value: torch.Tensor | QTensor, quant: str | None, group_size: int,
            where: str, device: str | torch.device | None = None) -> torch.Tensor | QTensor:
    """`value` as it will be stored: a float tensor, or a QTensor of the target qtype (quantized
    on `device`, default the tensor's own: the same bytes either way, see gdsllm.quant.rtn)."""
    at = f"{where} tensor {name}"
    if isinstance(value, QTensor):
        target = value.qtype if quant is None else target_qtype(name, quant)
        if name in WIDE and quant is None:  # a GGUF's 4-bit embedding / head: int8, exactly
            target = "int8"
        if target is None:  # --quant none never reaches here with a QTensor; keep it safe anyway
            return value.dequantize()
        if target == value.qtype:
            return value
        if target == "int8":
            return value.to_int8()
        return quantize(value.dequantize(), target, group_size, at, device=device)
    target = None if quant is None else target_qtype(name, quant)
    return value if target is None else quantize(value, target, group_size, at, device=device)
