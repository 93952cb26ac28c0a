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

On the CPU backend a resident unit's quantized and half-precision weights are also kept as float
copies, made once (`HostCopies`, used by gdsllm.engine.runner): those copies are the unit's own.

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


HOST_COPY_FRACTION = 0.5  # of the memory available when the first copy is made


class HostCopies:
    """The CPU backend's float copies of resident units: each quantized weight (int4 / int8)
    dequantized once, each half-precision tensor upcast once, to the compute dtype, on the unit's
    first use, as long as the copies fit in `budget` bytes (default: HOST_COPY_FRACTION of
    MemAvailable at the first copy). A unit that does not fit keeps its views, and its quantized
    weights are dequantized per matmul (gdsllm.quant.kernels_cpu).

        copies = HostCopies(torch.float32)
        weights = copies.weights(unit.index, pinned_weights)   # the copy, or the views as given

    Why: a pass reads each resident weight once per token, so dequantizing it every pass costs
    more than the matmul itself; measured on the 2-core development machine (2026-12-03, SmolLM2
    135M shapes, one block's seven projections): one token 0.3-0.5 ms over the float copies,
    4.7-5.9 ms with torch's `_weight_int4pack_mm_for_cpu` over a repacked layout, 23-28 ms
    dequantizing per call; 256 tokens 18-21 ms, 1,040-1,560 ms and 32-47 ms. The values are the
    very ones `QuantWeight.dequantize` gives, so the numbers computed do not change."""

    def __init__(self, dtype: torch.dtype, budget: int | None = None):
        self.dtype, self.budget = dtype, budget
        self.copies: dict[int, dict] = {}
        self.sizes: dict[int, int] = {}  # bytes of each unit's copies
        self.nbytes = 0  # held by all the copies
        self.skipped: set[int] = set()  # units that did not fit, left as views

    def weights(self, unit: int, views: dict) -> dict:
        """`views` with its quantized and half-precision tensors as copies in `self.dtype`, made
        on the first call for `unit` if they fit the budget; otherwise `views` as they are."""
        got = self.copies.get(unit)
        if got is not None or unit in self.skipped:
            return views if got is None else got
        need = sum(_copy_nbytes(v, self.dtype) for v in views.values())
        if self.budget is None:
            from gdsllm.engine.llm import free_memory
            self.budget = int(free_memory(torch.device("cpu")) * HOST_COPY_FRACTION)
        if self.nbytes + need > self.budget:
            self.skipped.add(unit)
            return views
        got = self.copies[unit] = {k: _host_copy(v, self.dtype) for k, v in views.items()}
        self.sizes[unit] = need
        self.nbytes += need
        return got

    def drop(self, unit: int) -> None:
        """Forget `unit`'s copy (its views now hold other bytes)."""
        self.copies.pop(unit, None)
        self.nbytes -= self.sizes.pop(unit, 0)
        self.skipped.discard(unit)


def _needs_copy(v, dtype: torch.dtype) -> bool:
    return isinstance(v, QuantWeight) or (v.is_floating_point() and v.dtype != dtype)


def _copy_nbytes(v, dtype: torch.dtype) -> int:
    if not _needs_copy(v, dtype):
        return 0
    n = v.shape[0] * v.shape[1] if isinstance(v, QuantWeight) else v.numel()
    return n * dtype.itemsize


def _host_copy(v, dtype: torch.dtype):
    if isinstance(v, QuantWeight):
        return v.dequantize(dtype)
    return v.to(dtype) if _needs_copy(v, dtype) else v
