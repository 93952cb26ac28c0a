"""The CPU backend's copies of resident units, in the form its kernels read (the runner's; see HostCopies).

    copies = HostCopies(torch.float32)
    weights = copies.weights(unit.index, pinned_weights)   # the copy, or the views as given
"""
from __future__ import annotations

import torch

from gdsllm.engine.budget import host_available_bytes
from gdsllm.models.layers import FUSED
from gdsllm.quant.kernels_cpu import FusedInt4, fusable, fused_nbytes, resident, resident_nbytes
from gdsllm.quant.schemes import QuantWeight


HOST_COPY_FRACTION = 0.5  # of the memory available when the first copy is made


class HostCopies:
    """The CPU backend's copies of resident units: each quantized weight (int4 / int8) in its
    resident CPU form (`gdsllm.quant.kernels_cpu.resident`: int4 repacked for torch's CPU kernel,
    int8 as a float16 copy; int4 projections of one input as one `FusedInt4` under the name
    gdsllm.models.layers.FUSED gives them, their parts left as views), each half-precision
    tensor upcast once to the compute dtype, on the unit's first use, as long as the copies fit in `budget` bytes (default: HOST_COPY_FRACTION of
    MemAvailable at the first copy; the bytes counted are those the copies allocate). A unit that
    does not fit keeps its views, and its quantized weights are dequantized per matmul
    (gdsllm.quant.kernels_cpu.linear).

        copies = HostCopies(torch.float32)
        weights = copies.weights(unit.index, pinned_weights)   # the copy, or the views as given

    Why: a pass reads each resident weight once per token, so dequantizing it every pass costs
    more than the matmul itself (257 ms against 32 ms over float32 copies for the default
    model's 210 int4 projections at one token; gdsllm.quant.kernels_cpu lists what was measured
    and why the resident forms are what they are). Unquantized weights keep float32 math,
    exact against the float32 reference; quantized ones round activations to bfloat16 (int4)
    or float16 (int8) in their matmuls."""

    def __init__(self, dtype: torch.dtype, budget: int | None = None, exact: bool = False):
        """`exact`: quantized weights as copies in `dtype` too (what `QuantWeight.dequantize`
        gives, float32 math: exact against the dequantized reference, 4x slower decode)."""
        self.dtype, self.budget, self.exact = dtype, budget, exact
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
        fused = {} if self.exact else {
            name: parts for name, parts in FUSED.items()
            if all(n in views for n in parts) and fusable([views[n] for n in parts])}
        parts = {n for ps in fused.values() for n in ps}  # kept as their views
        need = sum(_copy_nbytes(v, self.dtype, self.exact) for k, v in views.items() if k not in parts)
        need += sum(fused_nbytes([views[n] for n in ps]) for ps in fused.values())
        if self.budget is None:  # a claim on host memory: the VRAM ledger's rule for the CPU
            self.budget = int(host_available_bytes() * HOST_COPY_FRACTION)
        if self.nbytes + need > self.budget:
            self.skipped.add(unit)
            return views
        got = {k: v if k in parts else _host_copy(v, self.dtype, self.exact) for k, v in views.items()}
        got.update({name: FusedInt4.of([views[n] for n in ps]) for name, ps in fused.items()})
        self.copies[unit] = got
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


def _copy_nbytes(v, dtype: torch.dtype, exact: bool) -> int:
    if isinstance(v, QuantWeight):
        return v.shape[0] * v.shape[1] * dtype.itemsize if exact else resident_nbytes(v)
    return v.numel() * dtype.itemsize if _needs_copy(v, dtype) else 0


def _host_copy(v, dtype: torch.dtype, exact: bool):
    if isinstance(v, QuantWeight):
        return v.dequantize(dtype) if exact else resident(v)
    return v.to(dtype) if _needs_copy(v, dtype) else v
