"""The CPU backend's float copies of resident units (the runner's; see HostCopies).

    copies = HostCopies(torch.float32)
    weights = copies.weights(unit.index, pinned_weights)   # the copy, or the views as given
"""
from __future__ import annotations

import torch

from gdsllm.engine.budget import host_available_bytes
from gdsllm.quant.schemes import QuantWeight


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
        if self.budget is None:  # a claim on host memory: the VRAM ledger's rule for the CPU
            self.budget = int(host_available_bytes() * HOST_COPY_FRACTION)
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
