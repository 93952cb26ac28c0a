"""Re-quantize a GdsLLM model directory: `gdsllm convert MODEL_DIR DST --quant int4|int8|none`.

    requantize("~/models/x", "~/models/x.int4", quant="int4", group_size=64)

Each unit is read, viewed and handed to the writer, which applies `gdsllm.quant.policy` as for a
Hugging Face checkpoint: one unit in memory at a time. A quantized source is dequantized first
(its exact values), so int4 -> int8 or `--quant none` work too, in groups of the new size.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from gdsllm.models.views import unit_tensors
from gdsllm.format.metadata import load_model_meta, verify_unit
from gdsllm.convert.writer import ModelWriter, unit_progress
from gdsllm.quant.schemes import QuantWeight


def requantize(src: str | os.PathLike, dst: str | os.PathLike, quant: str, group_size: int = 64,
               dtype: str | None = None, progress: bool = False,
               quant_device: str | None = None) -> Path:
    meta = load_model_meta(src)
    with ModelWriter(dst, meta.params, dtype or meta.dtype, chat_template=meta.chat_template,
                     source=f"gdsllm:{meta.root}", quant=None if quant == "none" else quant,
                     group_size=group_size, quant_device=quant_device,
                     architecture=meta.architecture) as w:
        for u in unit_progress(meta.units, len(meta.units), f"convert {meta.root.name}", progress):
            buf = torch.frombuffer(bytearray(meta.path(u).read_bytes()), dtype=torch.uint8)
            verify_unit(meta, u, buf)
            tensors = {k: v.dequantize(torch.float32) if isinstance(v, QuantWeight) else v
                       for k, v in unit_tensors(u, buf).items()}
            w.add_unit(tensors)
            del tensors, buf
        for name in meta.extra_files:
            w.add_file(name, meta.root / name, tokenizer=name == meta.tokenizer_file)
    return w.dst
