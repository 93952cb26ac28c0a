"""CPU kernels for quantized weights, and the one place that decides how a resident quantized
weight is held on the CPU.

    y = linear(qw, x)          # streamed: dequantize, one float32 matmul ([T, K] -> [T, N])
    rw = resident(qw)          # resident: the form kept for the unit's lifetime (HostCopies)
    y = rw.linear(x)           # its kernel; rw is still a QuantWeight (dequantize, values),
                               # or a float32 tensor (int4 on a torch older than 2.5)
    n = resident_nbytes(qw)    # the bytes `resident` allocates (the host-memory budget)

Resident forms, chosen by measurement (benchmarks/bench_cpu_linear.py: every quantized weight
of SmolLM2-135M, the 210 int4 block projections and the int8 tied embedding as LM head, each
over its own memory as a pass reads them, best of 5; 2-core AMD EPYC with AVX-512 BF16, torch
2.13, 1 thread, 2026-12-03 20:03 UTC, load average 2.2-3.1 from other jobs):

    int4 (210 weights)            resident   M=1       M=16      M=256     max rel. error
    float32 copy + F.linear       425 MB     31.8 ms   61 ms     564 ms    0 (reference)
    float16 copy + F.linear       212 MB     16.5 ms   146 ms    3,069 ms  8e-4
    bfloat16 copy + F.linear      212 MB     18.7 ms   24 ms     193 ms    6e-3
    int4pack, bfloat16 x          66 MB      5.6 ms    25 ms     513 ms    8e-3
    int4pack, float32 x           80 MB      117 ms (2 threads: the kernel's slow path)
    dequantize per call           66 MB      257 ms (2 threads)

    int8 head [49152, 576]        resident   M=1       M=16      M=256     max rel. error
    float32 copy + F.linear       113 MB     7.7 ms    24 ms     261 ms    0 (reference)
    float16 copy + F.linear       57 MB      2.5 ms    42 ms     904 ms    5e-4
    bfloat16 copy + F.linear      57 MB      4.9 ms    5.9 ms    56 ms     4e-3


    the int8 head, float16 copy   rows:  1        2        4        8        16       256
    float32 copy + F.linear                7.5 ms   21 ms    17 ms    19 ms    17 ms    179 ms
    float16 copy + F.linear                2.5 ms   4.9 ms   11 ms    24 ms    40 ms    632 ms
    float16 copy upcast per call + F.linear   60 ms (fresh float32 tensor) to 235 ms

(that table: 20:19 UTC, load average 1.7.) `_weight_int8pack_mm` takes one scale per row, not
the (scale, zero) groups these weights have: no candidate. The bfloat16 copy, fastest from 2
rows on, rounds its output to bfloat16: logits near 25 come in steps of 0.125, which ties the
default model's two best first tokens for "What is the capital of France?" (25.30 and 25.22 in
float32) and answers "L'Étoile" instead of "The capital of France is Paris." float16 keeps them
apart (25.14 and 25.09, with the int4 blocks below).

Hence int4: `PackedInt4`, torch's `_weight_int4pack_mm_for_cpu` over the weight repacked once,
activations rounded to bfloat16 (its fast path; the stored scales are already bfloat16),
fastest at every M and a sixth of the float32 copy's memory; its bfloat16 outputs are
activations inside a block. int8: `HalfCopy` in float16, a float16 GEMV up to
HALF_ROWS rows (decode, small batches; float32 math where an input or output exceeds float16's
range) and float32 math over the copy upcast per call beyond (prompts, perplexity), half the
memory of a float32 copy. The perplexity of GPL-3 at ctx 256
on the default model: 28.0420 with float32 copies, 28.0594 (+0.06%) with these.
Unquantized weights stay float32 on the CPU (gdsllm.engine.host_copies), exact against
transformers' float32 reference; `LLM(cpu_exact=True)` keeps quantized ones as float32 copies.

Projections that read the same input (q, k and v; gate and up) are multiplied as one int4 matmul
over their rows concatenated (`FusedInt4`, made by gdsllm.engine.host_copies where the layer
names them in gdsllm.models.layers.FUSED): bit-identical outputs (the kernel's sum over K per
output column does not depend on N), one bfloat16 cast of the input, one float32 cast of the
output and one OpenMP region instead of three or two. The 150 q/k/v/gate/up matmuls of one
token (benchmarks/bench_cpu_ops.py, best of 20, 2026-12-04, load average 2.8-4.4 from other
jobs): 2.64-3.22 ms as five PackedInt4 a block against 1.93-2.07 ms as two FusedInt4 with 2
threads, 3.70 against 3.12 ms with 1 thread. `LLM` decode of the default model with this, the
joint rotary embedding and the float32 RMSNorm path (gdsllm.models.layers) and the KV views
(gdsllm.models.attention.Segment.first), against none of them, interleaved in one process,
1 thread, 6 rounds of 64 tokens, load average 3.6-3.8: median 63.1 against 57.9 tokens/s.

Not taken: the resident copies in transparent huge pages (anonymous 2 MiB-aligned mappings
marked MADV_HUGEPAGE; /dev/shm has none here, shmem_enabled is `never`). The same 210 matmuls
and the head from such memory against torch's 4 KiB pages, 1 thread, best of 20-30: 4.50-4.77
against 4.65-4.86 ms (blocks), 2.22-2.39 against 2.16-2.33 ms (head), 7.13 against 7.56 ms
(all, load average 4.2); `LLM` decode as above: median 63.1 with them against 63.8 tokens/s
without. Within the noise of the shared machine: no gain shown, so no second allocator.

A streamed unit would need its repack on every load, the cost of a dequantize: `linear` makes
one temporary float copy of ONE weight, freed after its matmul (QuantWeight.dequantize runs in
place on it), float32 math as the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdsllm.quant.int4pack import unpack_int4
from gdsllm.quant.schemes import QuantWeight


def linear(w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.dequantize(x.dtype))


HALF_ROWS = 8  # up to this many rows a float16 copy multiplies in float16 (measured above)
try:  # torch 2.5 and later; before, an int4 weight is resident as a float32 copy
    # the overload itself: 120 calls a token of the default model skip the packet's lookup
    _INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    INT4_KERNEL = True
except (AttributeError, RuntimeError):
    INT4_KERNEL = False


def resident(w: QuantWeight) -> QuantWeight | torch.Tensor:
    """The form a resident quantized weight keeps on the CPU (module docstring)."""
    if w.qtype == "int4":
        return PackedInt4.of(w) if INT4_KERNEL else w.dequantize(torch.float32)
    return HalfCopy.of(w)


def resident_nbytes(w: QuantWeight) -> int:
    """Bytes `resident(w)` allocates beyond the views it keeps."""
    n, k = w.shape
    if w.qtype == "int4":
        return n * k // 2 if INT4_KERNEL else n * k * 4
    return n * k * 2


@dataclass
class PackedInt4(QuantWeight):
    """An int4 weight repacked once for torch's CPU kernel (`_weight_int4pack_mm_for_cpu`):
    `packed` uint8 [N, K / 2]. The stored views stay (the kernel reads the bfloat16 scales as
    stored; `dequantize` / `values` read the data: the embedding gather, a router's copy)."""

    packed: torch.Tensor | None = None

    @classmethod
    def of(cls, w: QuantWeight) -> "PackedInt4":
        q = unpack_int4(w.data, w.shape).to(torch.int32)
        return cls(w.qtype, w.shape, w.group_size, w.data, w.scales,
                   torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return int4_mm(x, self.packed, self.group_size, self.scales)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales: torch.Tensor
            ) -> torch.Tensor:
    """x [T, K] times a repacked int4 weight (PackedInt4 / FusedInt4), x rounded to bfloat16 (the
    kernel's fast path), the result in x's dtype."""
    y = _INT4_MM(x.to(torch.bfloat16), packed, group_size, scales)
    return y.to(x.dtype)


def fusable(parts: list) -> bool:
    """Whether these weights can be held as one `FusedInt4` (int4 with the kernel, one K and group)."""
    return INT4_KERNEL and all(
        isinstance(w, QuantWeight) and w.qtype == "int4" and w.shape[1] == parts[0].shape[1]
        and w.group_size == parts[0].group_size for w in parts)


def fused_nbytes(parts: list[QuantWeight]) -> int:
    """Bytes `FusedInt4.of(parts)` allocates: the repacked rows and the concatenated scales."""
    return sum(resident_nbytes(w) + w.scales.nbytes for w in parts)


@dataclass
class FusedInt4:
    """Int4 weights that multiply the same input, repacked as one [sum N, K] weight for
    `_weight_int4pack_mm_for_cpu` (module docstring); `linear` returns [T, sum N], the parts'
    outputs side by side in the order given (`sizes` columns each)."""

    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, parts: list[QuantWeight]) -> "FusedInt4":
        q = torch.cat([unpack_int4(w.data, w.shape) for w in parts]).to(torch.int32)
        return cls(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2),
                   torch.cat([w.scales for w in parts], dim=1), parts[0].group_size,
                   tuple(w.shape[0] for w in parts))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return int4_mm(x, self.packed, self.group_size, self.scales)


@dataclass
class HalfCopy(QuantWeight):
    """A quantized weight held as a float16 copy `half` [N, K] of its float32 values (one
    rounding); the stored views stay for `dequantize` (the embedding gather stays exact)."""

    half: torch.Tensor | None = None

    @classmethod
    def of(cls, w: QuantWeight) -> "HalfCopy":
        return cls(w.qtype, w.shape, w.group_size, w.data, w.scales,
                   w.dequantize(torch.float32).to(torch.float16))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= HALF_ROWS:
            y = F.linear(x.to(torch.float16), self.half)
            # beyond float16's range (an inf, or a NaN made of one): float32 math instead; one
            # sum, in float32, costs a fifth of isfinite().all() over a vocabulary's logits
            if bool(y.sum(dtype=torch.float32).isfinite()):
                return y.to(x.dtype)
        return F.linear(x, self.half.to(x.dtype))
