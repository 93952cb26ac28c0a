"""CUDA kernels for quantized weights, reading the packed bytes where they landed (a VRAM slot).

    y = linear(qw, x)      # x [T, K] (float16 / bfloat16 / float32) -> [T, N] in x's dtype

Per row count T (decode batches, draft verification, prefill chunks) `CHOICES` names, by
measurement (table below), one of:
- "tinygemm": torch's `_weight_int4pack_mm` over the stored int4 tile layout (x cast to bfloat16,
  its only input dtype, and the result back; no cast in a model with int4 weights, which
  computes in bfloat16 on CUDA: gdsllm.engine.runner.compute_dtype). Its layout is probed once per process before the
  first use (`check_int4_layout`). Half-precision x only.
- a tile of the Triton W4A16 / W8A16 GEMM (`gdsllm.quant.triton_gemm`), which splits the stored
  words into bit planes in registers (no copy of the weight).
- "dequant": the weight is dequantized into ONE scratch buffer per device and dtype (`scratch`:
  grown to the largest weight by the eager calls before any capture, so never during one; its
  size is in the VRAM ledger, `gdsllm.engine.budget.scratch_bytes`) in the plane order, and
  cuBLAS multiplies it by x permuted the same way.
float32 x (or a tile the shape cannot run: int4 tensor-core tiles need K a multiple of 128) takes
"dequant" where the table says tinygemm or such a tile.

Nothing here touches the host inside a captured CUDA graph: no host tensor, no `.item()`; the only
allocations are outputs, permuted activations and split-K partials from the graph's pool; a
scratch buffer a graph captured is kept alive for good (its address is baked into the graph).

Measured on an H200 (driver 580.159.04, torch 2.11.0+cu130, Triton 3.6.0, 2026-12-03;
`benchmarks/bench_kernels.py --sweep --big`, docs/bench-kernels-planes-2026-12-03-h200.json):
us per matmul summed over the LLaMA-7B shapes 4096x4096 + 11008x4096 + 4096x11008 (N x K, random
weights, groups of 128, float16 x), each timed as a CUDA graph over 256 MiB of weight copies (from
HBM, no launch cost); int4 / int8: the option CHOICES runs at that M (every option was checked
against float32 math, relative error < 2e-2); "dq": dequantize + cuBLAS at that M, for comparison.

    M             1     2     4     8    16    24    32    48    64   128   256   512  1024
    bfloat16     68    68    68    69    69    69    68    70    71    74    94   153   285
    float16      68    70    68    70    69    70    70    70    69    74    96   157   292
    int4         55    57    69    84    88   130   134   159   160   170   192   260   422
    int4 dq     157   156   156   157   157   158   158   159   160   170   192   260   422
    int8         90   116   117   120   123   197   171   202   201   213   230   296   456
    int8 dq     198   198   197   198   200   201   200   202   201   213   230   297   456

int4: tinygemm to 4 rows (it includes the two casts a float16 model pays), the Triton tile
(16, 64, 4, 3, 8, 16, swapped) to 32, then dequantize; int8: the GEMV tile at one row, swapped
tensor-core tiles to 32, then dequantize. Only int4 at 1-2 rows beats float16 (55 against 68 us);
from 4 rows every quantized option here is slower than float16: the Triton tiles read the packed
bytes slowly (int4 at 16 rows: 57 MB in 88 us, float16 214 MB in 69; not profiled), and the
dequantization writes 2 bytes a weight that cuBLAS reads back (about +90 us summed for int4 at
every M, +130 for int8). tinygemm without the casts (bfloat16 x, the earlier sweep of the same
day, docs/bench-kernels-2026-12-03-h200.json): 38 us summed at 1 row, 40 at 2, 51 at 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import FormatError
from gdsllm.quant.schemes import QuantWeight

# (largest T, kernel) by T ascending: the first with T >= rows; "dequant" past the last. A kernel
# is "tinygemm", "dequant" or a triton_gemm.Config's fields. Each is the option with the least
# time summed over the three 7B shapes at the measured T it covers (the table above).
CHOICES = {
    "int4": ((4, "tinygemm"), (32, (16, 64, 4, 3, 4, 128, True))),
    "int8": ((1, (1, 32, 4, 3, 4, 256)), (32, (16, 64, 4, 3, 4, 128, True))),
}

_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_captured: list[torch.Tensor] = []  # scratch buffers a graph holds the address of: never freed
_layout_checked = False


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_int4_layout() -> None:
    """FormatError if this torch does not pack int4 in the layout GdsLLM models are written in."""
    global _layout_checked
    if _layout_checked:
        return
    if capturing():
        raise RuntimeError("int4: the first tinygemm matmul of this process is inside a CUDA graph "
                           "capture; run one eagerly first (the layout probe reads back to the host)")
    from gdsllm.quant.int4pack import INT4_LAYOUT, probe_torch_layout
    why = probe_torch_layout("cuda")
    if why is not None:
        raise FormatError(f"this model stores int4 weights in the {INT4_LAYOUT} layout, and {why}; "
                          f"run it on the CPU, or convert it with --quant int8 or --quant none")
    _layout_checked = True


def choice(qtype: str, rows: int, k: int, dtype: torch.dtype):
    """What runs x [rows, k] of `dtype` against a `qtype` weight: "tinygemm", "dequant" or a Config."""
    from gdsllm.quant.triton_gemm import Config, usable
    kind = next((c for top, c in CHOICES[qtype] if rows <= top), "dequant")
    if kind == "tinygemm":
        return kind if dtype != torch.float32 else "dequant"
    if kind == "dequant":
        return kind
    cfg = Config(*kind)
    return cfg if usable(qtype, k, cfg) else "dequant"


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A buffer of at least `numel` elements, shared by every weight of this device and dtype
    (kernels on one stream run in order, so one weight's use ends before the next is written).
    Called at load with the ledger's size (gdsllm.engine.budget.scratch_bytes / itemsize), it
    takes the memory before the KV cache is sized from what is left."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one buffer for "cuda" and "cuda:0"
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, dtype)
    buf = _scratch.get(key)
    in_graph = capturing()
    if buf is None or buf.numel() < numel:
        if in_graph:
            raise RuntimeError(f"quantized matmul: the dequantization scratch must grow to {numel} "
                               f"elements inside a CUDA graph capture; run the shape eagerly first")
        _scratch.pop(key, None)  # freed here unless a graph captured it (then in _captured)
        buf = torch.empty(numel, dtype=dtype, device=device)
        _scratch[key] = buf
    if in_graph and not any(b is buf for b in _captured):
        _captured.append(buf)
    return buf[:numel]


def linear(w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    from gdsllm.quant import triton_gemm
    rows = x.shape[0]
    n, k = w.shape
    if rows == 0:
        return x.new_empty(0, n)
    if not capturing():  # the ledger's scratch (the largest weight) and the split-K counters
        scratch(x.device, x.dtype, n * k)  # exist before any capture
        triton_gemm.lock_buffer(x.device)
    kind = choice(w.qtype, rows, k, x.dtype)
    if kind == "tinygemm":
        check_int4_layout()
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), w.data,
                                               w.group_size, w.scales)
        return y.to(x.dtype)
    if kind != "dequant":
        return triton_gemm.matmul(x, w, kind)
    wp = triton_gemm.dequantize_into(w, scratch(x.device, x.dtype, n * k), planes=True)
    return F.linear(triton_gemm.permute_x(x, w), wp)
