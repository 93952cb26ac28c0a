"""The torch bridge: typed tensor views over the raw bytes of one unit, without a copy.

A unit's bytes land in a uint8 buffer (host memory on the CPU backend, a VRAM slot on CUDA);
`unit_tensors` turns them into the unit's tensors, each a view at the offset, dtype and shape that
`metadata.json` gives. This is the only way weights become tensors (DESIGN.md: weight != tensor).

    buf = aligned_host_buffer(unit.nbytes)
    reader.read(meta.path(unit), buf, unit.nbytes)
    weights = unit_tensors(unit, buf)          # {"self_attn.q_proj.weight": view, ...}

A quantized tensor (int4 / int8, gdsllm.quant.schemes) becomes a `QuantWeight`: views of its
packed values and of its (scale, zero) pairs, handed as they are to the kernels by
`gdsllm.models.layers.linear`.

On the CPU backend a resident unit's quantized and half-precision weights are also kept in the
form the CPU kernels read (int4 repacked, int8 as float16, half precision upcast to float32),
made once (`HostCopies`, used by gdsllm.engine.runner); the quantized forms keep these views too.

Contract: the views share the buffer's memory. They are valid only while the buffer holds this
unit: once the caller reuses the buffer (or slot) for another unit, every view taken from it
silently shows the new bytes. Drop the views (and, on CUDA, fence the work that reads them)
before the buffer is refilled.
"""
from __future__ import annotations

import torch

from gdsllm.format.metadata import DTYPES, ITEMSIZE, FormatError, TensorMeta, UnitMeta
from gdsllm.quant.schemes import DATA_DTYPE, SCALE_DTYPE, QuantWeight, data_shape, scales_shape


def unit_tensors(unit: UnitMeta, buf: torch.Tensor) -> dict[str, torch.Tensor | QuantWeight]:
    """Views of every tensor of `unit` over `buf` (a 1-D uint8 tensor on any device)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TypeError(f"unit {unit.name}: buffer must be a 1-D uint8 tensor, got "
                        f"{buf.dtype} with shape {tuple(buf.shape)}")
    if not buf.is_contiguous():
        raise ValueError(f"unit {unit.name}: buffer must be contiguous")
    if buf.numel() < unit.nbytes:
        raise ValueError(f"unit {unit.name} ({unit.file}): buffer holds {buf.numel()} bytes, "
                         f"the unit needs {unit.nbytes}")
    # Typed views need the element address aligned to the item size; metadata guarantees 4 KiB
    # offsets, so only the buffer's own base address can break it.
    if buf.data_ptr() % 16 != 0:
        raise ValueError(f"unit {unit.name}: buffer address {buf.data_ptr():#x} is not 16-byte aligned")
    out: dict[str, torch.Tensor | QuantWeight] = {}
    for t in unit.tensors:
        for a, end in t.spans:
            if end > unit.nbytes:
                raise FormatError(f"unit {unit.name} tensor {t.name}: bytes {a}..{end} run past "
                                  f"the unit's {unit.nbytes} bytes")
        if t.quant is not None:
            out[t.name] = _quant_view(t, buf)
            continue
        end = t.offset + t.nbytes
        assert t.nbytes == t.numel * ITEMSIZE[t.dtype], t
        # Slicing then .view(dtype) reinterprets the same storage: no copy, on any device.
        view = buf[t.offset:end].view(DTYPES[t.dtype]).view(t.shape)
        assert view.data_ptr() == buf.data_ptr() + t.offset
        out[t.name] = view
    return out


def _quant_view(t: TensorMeta, buf: torch.Tensor) -> QuantWeight:
    q = t.quant
    assert q is not None
    shape = (t.shape[0], t.shape[1])
    data = buf[t.offset: t.offset + t.nbytes].view(DATA_DTYPE[q.qtype]).view(data_shape(q.qtype, shape))
    sc = buf[q.scales_offset: q.scales_offset + q.scales_nbytes].view(SCALE_DTYPE[q.qtype])
    return QuantWeight(q.qtype, shape, q.group_size, data, sc.view(scales_shape(shape, q.group_size)))
